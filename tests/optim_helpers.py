"""Helpers shared by the optimizer tests."""

from __future__ import annotations

import io

import torch


def roundtrip(state_dict):
    """A state dict through torch.save / torch.load(weights_only=True), as HF's Trainer loads optimizer.pt."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    actual = actual.double()
    # atol covers values that pass near zero, where a relative bound is meaningless.
    atol = rtol * max(1e-3, float(expected.abs().max()) if expected.numel() else 0.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, NaN to NaN: a NaN's payload and sign depend on how a conversion or a
    negation was spelt."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = a.isnan()
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(as_int)[~nan], b.view(as_int)[~nan])


def stepped_lion(**kwargs):
    """Two fp32 params (a matrix and a vector) and a Lion that took one step on seeded gradients."""
    from lion_hf import Lion

    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (4,)]]
    opt = Lion(params, lr=1e-2, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return params, opt
