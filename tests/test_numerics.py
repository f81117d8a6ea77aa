"""The shared numerics: rounding, the hash, the seeds, the per-tensor update (lion_hf/optim/numerics.py)."""

from __future__ import annotations

import math

import torch

from lion_hf.optim.numerics import stochastic_round_to_bf16, stochastic_round_to_fp16


def test_stochastic_rounding_is_unbiased():
    # 1 + 2**-9 lies a quarter of the way from bf16 1.0 to its neighbour 1 + 2**-7.
    x = torch.full((400_000,), 1.0 + 2**-9)
    rounded = stochastic_round_to_bf16(x, 12345).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    std_of_mean = 2**-7 * math.sqrt(0.25 * 0.75 / x.numel())
    assert abs(float(rounded.mean()) - (1.0 + 2**-9)) < 5 * std_of_mean
    negative = stochastic_round_to_bf16(-x, 999).float()
    assert abs(float(negative.mean()) + (1.0 + 2**-9)) < 5 * std_of_mean


def test_stochastic_rounding_keeps_every_nan_a_nan():
    payloads = torch.tensor([0x7F800001, 0x7FC00000, -1, 0x7F80FFFF], dtype=torch.int32)  # -1: all bits set
    x = payloads.view(torch.float32)
    assert torch.isnan(x).all()
    for seed in range(0, 1 << 16, 4099):
        assert torch.isnan(stochastic_round_to_bf16(x, seed).float()).all()


def test_fp16_stochastic_rounding_is_unbiased_and_keeps_specials():
    # 1 + 2**-12 lies a quarter of the way from fp16 1.0 to its neighbour 1 + 2**-10.
    x = torch.full((400_000,), 1.0 + 2**-12)
    rounded = stochastic_round_to_fp16(x, 321).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-10}
    std_of_mean = 2**-10 * math.sqrt(0.25 * 0.75 / x.numel())
    assert abs(float(rounded.mean()) - (1.0 + 2**-12)) < 5 * std_of_mean
    tiny = torch.full((100_000,), -(2.0**-26))  # a quarter of the smallest fp16 subnormal, negative
    assert abs(float(stochastic_round_to_fp16(tiny, 7).float().mean()) + 2.0**-26) < 2.0**-28
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 65504.0])
    out = stochastic_round_to_fp16(specials, 11).float()
    assert torch.isnan(out[0]) and torch.equal(out[1:], specials[1:])
