"""Validation: options, hyperparameters, loaded state and step tensors (lion_hf/optim/validation.py)."""

from __future__ import annotations

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim.lion import lion


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(betas=(1.0, 0.99)), "beta1"),
        (dict(betas=(0.9, -0.1)), "beta2"),
        (dict(betas=0.9), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(impl="cuda_magic"), "impl"),
        (dict(state_dtype="fp8"), "state_dtype"),
        (dict(nonfinite_grad="ignore"), "nonfinite_grad"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def _stepped_lion(**kwargs):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (4,)]]
    opt = Lion(params, lr=1e-2, **kwargs)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return params, opt


def test_add_param_group_validates_before_adding():
    _, opt = _stepped_lion()
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr must be"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1, "a rejected group must not stay in the optimizer"
    opt.add_param_group({"params": extra, "lr": torch.tensor(0.5)})  # a 1-element tensor lr, like the top level
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["params"] == [extra]


def test_functional_lion_refuses_lists_of_different_lengths():
    p, g, m = torch.zeros(2), torch.ones(2), torch.zeros(2)
    with pytest.raises(ValueError, match="same length, got 2, 1, 2 and 2"):
        lion([p, p.clone()], [g], [m, m.clone()], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


@pytest.mark.parametrize("attribute,value", [("nonfinite_grad", "skip_element"), ("impl", "fused")])
def test_an_option_changed_to_a_bad_value_after_init_is_a_value_error_at_the_step(attribute, value):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([p], lr=0.1, impl="foreach")
    setattr(opt, attribute, value)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=attribute):
        opt.step()
    opt.param_groups[0]["param_rounding"] = "Kahan"
    setattr(opt, attribute, {"nonfinite_grad": "skip_elements", "impl": "foreach"}[attribute])
    with pytest.raises(ValueError, match="param_rounding"):
        opt.step()
    torch.testing.assert_close(p.detach(), torch.zeros(3))


def test_a_kahan_residual_that_does_not_match_its_param_is_a_value_error():
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    opt = Lion([p], lr=0.1, impl="foreach", param_rounding="kahan")
    p.grad = torch.ones_like(p)
    opt.step()
    opt.state[p]["kahan_comp"] = torch.zeros(12, dtype=torch.bfloat16)  # e.g. a checkpoint of another model
    with pytest.raises(ValueError, match="Kahan residual"):
        opt.step()
    torch.testing.assert_close(p.detach().float(), torch.full((4, 3), -0.1), atol=1e-3, rtol=0)


def test_bad_param_rounding_is_a_value_error():
    with pytest.raises(ValueError, match="param_rounding"):
        Lion([torch.nn.Parameter(torch.zeros(2))], param_rounding="truncate")
    p = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compensation tensor"):
        lion([p], [torch.ones(3, dtype=torch.bfloat16)], [torch.zeros(3)], lr=0.1, beta1=0.9, beta2=0.99,
             weight_decay=0.0, param_rounding="kahan", impl="foreach")
