"""Validation: options, hyperparameters, loaded state and step tensors (lion_hf/optim/validation.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from optim_helpers import stepped_lion

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


def test_add_param_group_validates_before_adding():
    _, opt = stepped_lion()
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


# --------------------------------------------------------------------------------------
# Hyperparameters, wherever they enter (issue: nothing poisoned)
# --------------------------------------------------------------------------------------

IMPLS = ["for_loop", "foreach", "cpp", "triton"]


def _model_and_lion(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, Lion(model.parameters(), lr=1e-3, **kwargs)


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), r"param group 0: lr must be a finite number >= 0, got nan"),
    ("lr", -1.0, r"param group 0: lr must be a finite number >= 0, got -1.0"),
    ("weight_decay", float("inf"), r"param group 0: weight_decay must be a finite number >= 0, got inf"),
    ("betas", (0.9, 1.5), r"param group 0: betas: beta2 must be in \[0, 1\), got 1.5"),
    ("lr", True, r"param group 0: lr must be a real number, got True"),
    ("lr", 1e39, r"param group 0: lr must be a finite number >= 0, got 1e\+39 \(finite in float32"),
    ("weight_decay", 1e39, r"param group 0: weight_decay must be a finite number >= 0, got 1e\+39"),
])
def test_a_checkpoint_with_a_bad_hyperparameter_is_refused_and_changes_nothing(key, value, match):
    model, opt = _model_and_lion()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["param_groups"][0][key] = value
    before = {k: v.clone() for k, v in opt.state[model.weight].items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1e-3
    assert all(torch.equal(before[k], opt.state[model.weight][k]) for k in before)


def _set_mid_run_then_step(impl: str, key: str, value, match: str) -> None:
    """After one good step, ``group[key] = value``: the next step is a ValueError matching
    ``match``, and the weights are unchanged."""
    model, opt = _model_and_lion(impl=impl)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    weights = model.weight.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(model.weight.detach(), weights)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("weight_decay", float("inf")), ("betas", (0.9, 1.0)),
                                       ("lr", -1e-3)])
def test_a_bad_value_set_mid_run_is_a_value_error_at_the_next_step_in_every_impl(impl, key, value):
    """A buggy scheduler writing NaN into group["lr"] used to turn every weight NaN."""
    _set_mid_run_then_step(impl, key, value, rf"param group 0: .*{'beta2' if key == 'betas' else key}")


def test_adamws_state_dict_is_refused_with_a_message_that_says_so():
    model, _ = _model_and_lion()
    adamw = torch.optim.AdamW(model.parameters(), lr=5e-4)
    fresh = Lion(model.parameters(), lr=1e-4)
    with pytest.raises(ValueError, match=r"another optimizer.*'amsgrad'|'amsgrad'.*another optimizer"):
        fresh.load_state_dict(adamw.state_dict())  # before AdamW's first step: its groups give it away
    model(torch.randn(2, 4)).sum().backward()
    adamw.step()
    saved = adamw.state_dict()
    for group in saved["param_groups"]:  # even stripped of its group keys, the state gives it away
        for key in ("eps", "amsgrad", "capturable", "decoupled_weight_decay"):
            group.pop(key, None)
    with pytest.raises(ValueError, match=r"holds 'exp_avg', 'exp_avg_sq', 'step'.*another optimizer"):
        fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["lr"] == 1e-4 and fresh.param_groups[0]["betas"] == (0.9, 0.99)
    assert not fresh.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_momentum_in_a_checkpoint_is_refused(bad):
    model, opt = _model_and_lion()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"][0, 1] = bad
    with pytest.raises(ValueError, match=r"exp_avg of param 0 has 1 NaN or inf value"):
        Lion(model.parameters(), lr=1e-3).load_state_dict(saved)


@pytest.mark.parametrize("lr", [np.float32(1e-4), np.float64(1e-4), torch.tensor(1e-4), torch.tensor([1e-4]), 1])
def test_what_torch_accepts_as_a_learning_rate_is_accepted(lr):
    opt = Lion([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=np.float32(0.1), betas=(np.float64(0.9), 0.99))
    group = opt.param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == pytest.approx(float(lr))
    assert type(group["weight_decay"]) is float and all(type(b) is float for b in group["betas"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=True), "lr must be a real number, got True"),
    (dict(lr=np.bool_(True)), "lr must be a real number"),
    (dict(weight_decay=False), "weight_decay must be a real number"),
    (dict(lr=torch.tensor([1e-4, 2e-4])), "1-element tensor"),
    (dict(lr="1e-4"), "lr must be a real number"),
    (dict(betas=(0.9, True)), r"betas\[1\] must be a real number"),
    (dict(maximize=1), "maximize must be True or False"),
])
def test_bools_and_other_non_numbers_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **{"lr": 1e-4, **kwargs})


def test_a_sign_flipping_decay_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Lion([torch.nn.Parameter(torch.zeros(2))], lr=0.5, weight_decay=3.0)
    assert [str(w.message)[:45] for w in caught] == ["Lion: param group 0: lr * weight_decay >= 1: "]
    with warnings.catch_warnings():  # only groups that use the defaults warn
        warnings.simplefilter("error")
        Lion([{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}], lr=0.5, weight_decay=3.0)
    opt = Lion([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.1)
    with pytest.warns(UserWarning, match="param group 1: lr \\* weight_decay >= 1"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0, "weight_decay": 2.0})


# --------------------------------------------------------------------------------------
# Tensors whose memory is not what their metadata says (the kernels read raw pointers)
# --------------------------------------------------------------------------------------


def _free(t):
    t.untyped_storage().resize_(0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which", ["param", "grad", "shrunk_param"])
def test_a_tensor_whose_storage_was_freed_is_a_value_error_not_a_crash(impl, which):
    """Freed storage (FSDP frees unsharded params this way) used to segfault cpp and for_loop."""
    p = torch.nn.Parameter(torch.randn(64))
    opt = Lion([p], lr=0.1, impl=impl)
    g = torch.ones(64)
    p.grad = g
    if which == "param":
        _free(p)
        match = r"param 0 \(shape \(64,\).*storage holds 0 bytes \(it was freed\)"
    elif which == "grad":
        _free(g)
        match = r"the grad of param 0 .*storage holds 0 bytes"
    else:  # still allocated, but smaller than the param's extent
        p.untyped_storage().resize_(16)
        match = r"param 0 .*needs 256 bytes from its start but its storage holds 16 bytes"
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert not opt.state[p] or not opt.state[p]["exp_avg"].any()


def test_a_strided_view_past_the_end_of_its_storage_is_refused():
    base = torch.zeros(10, 10)
    p = base[:, :2]  # in bounds: its strided extent, 92 elements, fits
    lion([p], [torch.ones(10, 2)], [torch.zeros(10, 2)], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
         impl="foreach")
    base.untyped_storage().resize_(4 * 80)  # numel * itemsize (80 bytes) would still fit; the extent does not
    with pytest.raises(ValueError, match=r"needs 368 bytes from its start but its storage holds 320"):
        lion([p], [torch.ones(10, 2)], [torch.zeros(10, 2)], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0,
             impl="foreach")


@pytest.mark.parametrize("impl", IMPLS)
def test_a_zero_tensor_grad_steps_as_zeros_in_every_impl(impl):
    """torch._efficientzerotensor has data_ptr 0: the C++ kernel used to segfault reading it."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 32))
    opt = Lion([p], lr=0.1, weight_decay=0.5, impl=impl)
    p.grad = torch._efficientzerotensor(32)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.linspace(-1, 1, 32) * (1 - 0.1 * 0.5), rtol=0, atol=0)
    assert not opt.state[p]["exp_avg"].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_a_negative_view_grad_steps_with_its_sign_in_every_impl(impl):
    """torch._neg_view keeps the memory of its base and a negation bit: the C++ kernel, reading
    raw memory, used to step the wrong way."""
    p = torch.nn.Parameter(torch.zeros(32))
    opt = Lion([p], lr=0.1, impl=impl)
    p.grad = torch._neg_view(torch.ones(32))
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((32,), 0.1), rtol=0, atol=0)
    torch.testing.assert_close(opt.state[p]["exp_avg"], torch.full((32,), -0.01), rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0, 2])
@pytest.mark.parametrize("which", ["param", "momentum (exp_avg)"])
@pytest.mark.parametrize("kind", ["zero tensor", "negative view"])
def test_a_param_or_momentum_that_cannot_be_written_in_place_is_refused(which, kind, offset):
    # offset 2: a slice of a zero tensor has a data_ptr that is not 0 (its offset in bytes), which
    # must not pass it as memory of its own.
    if kind == "zero tensor":
        make = (lambda t: torch._efficientzerotensor(t.numel() + offset)[offset:])
    else:
        make = (lambda t: torch._neg_view(torch.zeros(t.numel() + offset))[offset:])
    p, g, m = torch.zeros(8), torch.ones(8), torch.zeros(8)
    if which == "param":
        p = make(p)
    else:
        m = make(m)
    prefix = "param 0" if which == "param" else r"the momentum \(exp_avg\) of param 0"
    for impl in IMPLS:
        with pytest.raises(ValueError, match=rf"{prefix} is a {kind}"):
            lion([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, impl=impl)


def test_an_expanded_kahan_residual_is_refused_before_anything_is_written():
    """A Kahan residual whose elements share memory (an expanded view) cannot be written in place:
    the same ValueError as an expanded param, before the fp32 param beside it is stepped."""
    q, p = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    residual = torch.zeros(1, dtype=torch.bfloat16).expand(8)
    for impl in IMPLS:
        with pytest.raises(ValueError, match=r"the Kahan residual of param 1 \(shape \(8,\), strides \(0,\)\) has "
                                             "elements that share memory"):
            lion([q, p], [torch.ones(8), torch.ones(8, dtype=torch.bfloat16)],
                 [torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)], kahan_comps=[None, residual], lr=0.1,
                 beta1=0.9, beta2=0.99, weight_decay=0.0, param_rounding="kahan", impl=impl)
        assert not q.any()


@pytest.mark.parametrize("which", ["param", "momentum (exp_avg)"])
def test_a_sparse_param_or_momentum_is_refused_naming_its_layout(which):
    p, m = torch.zeros(8), torch.zeros(8)
    if which == "param":
        p = p.to_sparse()
    else:
        m = m.to_sparse()
    prefix = "param 0" if which == "param" else r"the momentum \(exp_avg\) of param 0"
    for impl in IMPLS:
        with pytest.raises(ValueError, match=rf"{prefix} has layout torch.sparse_coo; params and momenta must be"):
            lion([p], [torch.ones(8)], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, impl=impl)


# --------------------------------------------------------------------------------------
# Options changed mid-run, what torch accepts, and whole state dicts checked before loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,match", [
    ("maximize", 1, "maximize must be True or False"),
    ("cautious", "yes", "cautious must be True or False"),
    ("betas", (0.9, 0.99, 0.999), r"betas must be a pair \(beta1, beta2\), got \(0.9, 0.99, 0.999\)"),
    ("betas", (0.9,), r"betas must be a pair"),
])
def test_an_option_of_the_wrong_type_set_mid_run_is_a_value_error_naming_it(key, value, match):
    _set_mid_run_then_step("foreach", key, value, rf"param group 0: {match}")


def test_a_set_of_params_is_a_type_error_as_in_torch():
    params = {torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))}
    with pytest.raises(TypeError, match=r"ordered collection.*not a set"):
        Lion(params)
    opt = Lion([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(TypeError, match="not a frozenset"):
        opt.add_param_group({"params": frozenset(params)})
    with pytest.raises(TypeError, match="not a set"):
        Lion([{"params": params}])
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("lr", [np.array(1e-3), np.array([1e-3]), np.array([[1e-3]], dtype=np.float32)])
def test_a_one_element_numpy_array_is_accepted_as_torch_accepts_it(lr):
    opt = Lion([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=np.array(0.1))
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match=r"lr must be a real number or a 1-element array, got an array of shape"):
        Lion([torch.nn.Parameter(torch.zeros(2))], lr=np.array([1e-3, 2e-3]))
    with pytest.raises(ValueError, match="1-element array"):
        Lion([torch.nn.Parameter(torch.zeros(2))], lr=np.array(True))


def test_a_group_with_another_optimizers_key_is_refused_so_that_lions_own_state_dict_always_loads():
    model, opt = _model_and_lion()
    with pytest.raises(ValueError, match=r"param group 1: 'eps' is an option of other optimizers"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "eps": 1e-8})
    with pytest.raises(ValueError, match="'amsgrad', 'eps' is an option of other optimizers"):
        Lion([{"params": list(model.parameters()), "eps": 1e-8, "amsgrad": False}])
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    Lion(model.parameters(), lr=1e-3).load_state_dict(opt.state_dict())  # its own state dict: accepted


def _saved(opt):
    import copy

    return copy.deepcopy(opt.state_dict())


def _damage_unknown_key(saved):
    saved["state"][99] = saved["state"][0]


def _damage_no_lr(saved):
    del saved["param_groups"][0]["lr"]


def _damage_optimi(saved):  # optimi's Lion: beta1 / beta2 and its own options, an exp_avg state
    group = saved["param_groups"][0]
    beta1, beta2 = group.pop("betas")
    group.update(beta1=beta1, beta2=beta2, decouple_lr=False, kahan_sum=False, foreach=None)


def _damage_shape(saved):
    saved["state"][0]["exp_avg"] = torch.zeros(5, 5)


def _damage_int(saved):
    saved["state"][0]["exp_avg"] = torch.zeros(3, 4, dtype=torch.int64)


def _damage_group_count(saved):
    saved["param_groups"].append(dict(saved["param_groups"][0], params=[]))


def _damage_not_a_dict(saved):
    saved["state"][0] = torch.zeros(3, 4)


@pytest.mark.parametrize("damage,match", [
    (_damage_unknown_key, r"holds state for 99, which no param group of it lists"),
    (_damage_no_lr, r"param group 0 has no 'lr' \(it holds .*'betas'.*\): this state dict was not saved by "
                    r"lion_hf's Lion"),
    (_damage_optimi, r"param group 0 has no 'betas' \(it holds .*'beta1', 'beta2'"),
    (_damage_shape, r"exp_avg of param 0 has shape \(5, 5\) but its param has shape \(3, 4\)"),
    (_damage_int, r"exp_avg of param 0 has dtype torch.int64; it must be floating point"),
    (_damage_group_count, r"the state dict has 2 parameter groups, this optimizer 1"),
    (_damage_not_a_dict, r"the state of param 0 is a Tensor, not a dict"),
])
def test_a_damaged_or_foreign_state_dict_is_a_value_error_and_changes_nothing(damage, match):
    """Each used to be a KeyError (some after the state was replaced), or was accepted."""
    model, opt = _model_and_lion()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = _saved(opt)
    opt.param_groups[0]["lr"] = 5e-4
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    damage(saved)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 5e-4
    assert set(opt.state) == set(before)
    assert all(torch.equal(before[p][k], opt.state[p][k]) for p in before for k in before[p])


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=float("nan")), "lr must be a finite number >= 0, got nan"),
    (dict(learning_rate=float("inf")), "lr must be a finite number >= 0, got inf"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number >= 0, got nan"),
])
def test_lion_training_arguments_run_lions_group_validation(kwargs, match, tmp_path):
    from lion_hf import LionTrainingArguments

    with pytest.raises(ValueError, match=match):
        LionTrainingArguments(output_dir=str(tmp_path), **kwargs)


# --------------------------------------------------------------------------------------
# What the kernels compute with (float32), on every door; the same error in every impl
# --------------------------------------------------------------------------------------

# Finite in float64, not in float32 (the kernels' lr, weight decay and decay factor 1 - lr * wd).
FP32_OVERFLOWS = [({"lr": 1e39}, r"lr must be a finite number >= 0, got 1e\+39 \(finite in float32"),
                  ({"weight_decay": 1e39}, r"weight_decay must be a finite number >= 0, got 1e\+39"),
                  ({"lr": 1e30, "weight_decay": 1e10}, r"lr \* weight_decay = 1e\+40 .* is not finite in float32")]


@pytest.mark.parametrize("values,match", FP32_OVERFLOWS)
def test_a_hyperparameter_beyond_float32_is_refused_by_the_constructor_and_add_param_group(values, match):
    """lr=1e39 used to pass: for_loop and cpp then wrote inf or NaN weights without an error."""
    with pytest.raises(ValueError, match=match):
        Lion([torch.nn.Parameter(torch.zeros(2))], **values)
    opt = Lion([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="param group 1: " + match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **values})
    assert len(opt.param_groups) == 1
    args = {"lr": 1e-3, "weight_decay": 0.0, **values}
    with pytest.raises(ValueError, match=match):
        lion([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)], beta1=0.9, beta2=0.99, **args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("values,match", FP32_OVERFLOWS)
def test_a_hyperparameter_beyond_float32_set_mid_run_is_a_value_error_in_every_impl(impl, values, match):
    model, opt = _model_and_lion(impl=impl)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    weights = model.weight.detach().clone()
    opt.param_groups[0].update(values)
    with pytest.raises(ValueError, match="param group 0: " + match):
        opt.step()
    assert torch.equal(model.weight.detach(), weights) and torch.isfinite(weights).all()


def test_the_largest_float32_lr_is_accepted():
    Lion([torch.nn.Parameter(torch.zeros(2))], lr=float(np.finfo(np.float32).max))


def test_a_sign_flipping_decay_set_mid_run_warns_once_per_group():
    """Set mid-run, lr * weight_decay >= 1 used to pass without the warning the constructor gives
    (the weights then flip sign every step). The same text per group: Python's default filter
    shows it once per group, however often a scheduler changes lr."""
    model = torch.nn.Linear(4, 3)
    opt = Lion([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-3, weight_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    opt.param_groups[0]["lr"] = 20.0
    with pytest.warns(UserWarning, match=r"param group 0: lr \* weight_decay >= 1: .* flips the weights' sign"):
        opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for lr in (30.0, 40.0, 50.0):
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
    flips = sorted(str(w.message).split(":")[1] for w in caught if "flips the weights' sign" in str(w.message))
    assert flips == [" param group 0", " param group 1"], flips


@pytest.mark.parametrize("impl", IMPLS)
def test_an_inference_tensor_param_is_the_same_value_error_in_every_impl(impl):
    """cpp used to update it (through raw pointers) where the other impls raised torch's error."""
    with torch.inference_mode():
        p = torch.ones(4)
    with pytest.raises(ValueError, match=r"Lion: param 0 is an inference tensor .*inference_mode"):
        lion([p], [torch.ones(4)], [torch.zeros(4)], lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl=impl)
    assert torch.equal(p, torch.ones(4))
    m = torch.zeros(4)
    with torch.inference_mode():
        m_inference = m.clone()
    with pytest.raises(ValueError, match=r"the momentum \(exp_avg\) of param 0 is an inference tensor"):
        lion([torch.ones(4)], [torch.ones(4)], [m_inference], lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0,
             impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_meta_params_are_the_same_value_error_in_every_impl(impl):
    """cpp and triton used to raise another error (about the device) at construction."""
    p = torch.nn.Parameter(torch.ones(4, device="meta"))
    p.grad = torch.ones(4, device="meta")
    opt = Lion([p], impl=impl)  # built before the model is materialised, as torch's optimizers allow
    with pytest.raises(ValueError, match="Lion cannot step params on the meta device"):
        opt.step()
    meta = [torch.ones(4, device="meta")]
    with pytest.raises(ValueError, match="Lion cannot step params on the meta device"):
        lion(meta, meta, meta, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl=impl)
    # A slice of a meta tensor has a data_ptr that is not 0 (its offset in bytes): still refused,
    # a meta param among CPU ones as a meta grad or momentum is.
    sliced = torch.ones(6, device="meta")[2:]
    for i in range(3):
        tensors = [[torch.ones(4)], [torch.ones(4)], [torch.zeros(4)]]
        tensors[i] = [sliced]
        with pytest.raises(ValueError, match="Lion cannot step params on the meta device"):
            lion(*tensors, lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0, impl=impl)


def test_a_momentum_on_the_meta_device_in_a_state_dict_is_refused_by_name():
    """It used to be a RuntimeError from Tensor.item()."""
    model, opt = _model_and_lion()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros_like(saved["state"][0]["exp_avg"], device="meta")
    with pytest.raises(ValueError, match=r"the exp_avg of param 0 is on the meta device: it holds no values"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("key", ["lr", "betas", "weight_decay", "param_rounding"])
def test_a_key_deleted_from_a_group_mid_run_is_a_value_error_naming_it(key):
    """``del group["lr"]`` used to be a bare KeyError."""
    model, opt = _model_and_lion()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    weights = model.weight.detach().clone()
    del opt.param_groups[0][key]
    with pytest.raises(ValueError, match=rf"param group 0: has no '{key}': every Lion param group holds"):
        opt.step()
    assert torch.equal(model.weight.detach(), weights)
