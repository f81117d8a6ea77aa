"""Helpers shared by the optimizer tests."""

from __future__ import annotations

import io
import warnings

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


def two_simulated_ranks(monkeypatch, shapes, gen: torch.Generator, device) -> None:
    """DistributedLion as rank 0 of two, in one process: ``world_size()`` is 2 and the gather returns
    this rank's buffer and, as the other rank's, this rank's header followed by random signs for every
    element of ``shapes`` (drawn from ``gen`` now, so the caller's later draws stay where they were)."""
    from lion_hf import DistributedLion
    from lion_hf.optim import distributed
    from lion_hf.optim.signs import HEADER_BYTES, pack_signs

    numel = sum(torch.Size(s).numel() for s in shapes)
    other = pack_signs([torch.randint(-1, 2, (numel,), generator=gen).float()]).to(device)

    def gather(output, buffer, group):
        rows = output.view(2, -1)
        rows[0] = buffer
        rows[1, :HEADER_BYTES] = buffer[:HEADER_BYTES]
        rows[1, HEADER_BYTES:] = other

    monkeypatch.setattr(DistributedLion, "world_size", lambda self: 2)
    monkeypatch.setattr(distributed, "_all_gather", gather)


def record_calls(monkeypatch, module, names) -> list[tuple[str, bool]]:
    """Wrap ``module``'s functions ``names``: each call appends (name, whether it ran), to the list
    returned. A Triton entry point that does not run returns False or None, and its caller then falls
    back to torch, which would pass a bit-for-bit test against the torch path without the kernel."""
    calls = []
    for name in names:
        original = getattr(module, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            calls.append((_name, result is not False and result is not None))
            return result

        monkeypatch.setattr(module, name, recording)
    return calls


def assert_triton_signs_are_foreachs(groups, device, *, zero_nonfinite: bool) -> None:
    """DistributedLion's sign pass in the Triton kernel writes the trits torch's path (foreach) writes,
    and the kernel really ran; all three signs occur, so the comparison sees each."""
    from lion_hf.optim.foreach import foreach_signs
    from lion_hf.optim.triton_kernel import triton_signs

    numel = sum(g.numel() for group in groups for g in group.grads)
    want = torch.ones(numel, dtype=torch.uint8, device=device)
    foreach_signs(groups, want, zero_nonfinite=zero_nonfinite)
    got = torch.ones(numel, dtype=torch.uint8, device=device)
    assert triton_signs(groups, got, zero_nonfinite=zero_nonfinite)
    assert torch.equal(got, want)
    assert len(set(want.tolist())) == 3


def release_trainer_args(output_dir, **overrides):
    """LionTrainingArguments of the release tests' small LionTrainer runs (CPU, foreach, no clipping, no saving),
    built without the warnings the settings raise (clipping off under release, the lr scale)."""
    from lion_hf import LionTrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=1, learning_rate=1e-3,
                weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                lion_impl="foreach", disable_tqdm=True, max_grad_norm=0.0)
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LionTrainingArguments(**base)
