"""The one table of options (lion_hf/optim/options.py): every signature and field that takes an
option agrees with it, and validation allows exactly its choices."""

import dataclasses
import inspect
import warnings

import pytest
import torch

from lion_hf import DistributedLion, Lion, LionTrainingArguments, lion
from lion_hf.optim.options import DISTRIBUTED_DEFAULTS, GROUP_OPTIONS, NOT_LION_ARGUMENTS, OPTIONS
from lion_hf.optim.validation import validate_group, validate_options


def _defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_lion_and_distributed_lion_take_every_option_with_the_tables_default():
    lion_defaults = _defaults(Lion.__init__)
    assert set(lion_defaults) == set(OPTIONS) - set(NOT_LION_ARGUMENTS)
    assert lion_defaults == {name: option.default for name, option in OPTIONS.items() if name not in NOT_LION_ARGUMENTS}
    distributed = _defaults(DistributedLion.__init__)
    # cautious is refused there; gradient release is not for DistributedLion
    assert set(distributed) == set(OPTIONS) - {"cautious", "gradient_release"} | {"process_group"}
    for name in set(distributed) - {"process_group"}:
        assert distributed[name] == DISTRIBUTED_DEFAULTS.get(name, OPTIONS[name].default), name


def test_the_functional_step_takes_the_tables_defaults():
    defaults = _defaults(lion)
    assert (defaults.pop("beta1"), defaults.pop("beta2")) == OPTIONS["betas"].default
    defaults.pop("kahan_comps")
    assert defaults == {name: OPTIONS[name].default for name in defaults}
    assert set(defaults) == set(OPTIONS) - {"betas", "state_dtype", *NOT_LION_ARGUMENTS}


def test_training_arguments_take_the_tables_defaults_and_help():
    fields = {f.name: f for f in dataclasses.fields(LionTrainingArguments)}
    assert (fields["lion_beta1"].default, fields["lion_beta2"].default) == OPTIONS["betas"].default
    for name in ("impl", "state_dtype", "param_rounding", "cautious", "gradient_release"):
        field = fields[f"lion_{name}"]
        assert field.default == OPTIONS[name].default, name
        assert OPTIONS[name].help in field.metadata["help"], name
    assert OPTIONS["nonfinite_grad"].help in fields["lion_nonfinite_grad"].metadata["help"]
    assert fields["lion_nonfinite_grad"].default is None  # chosen from max_grad_norm (default_nonfinite_policy)
    assert OPTIONS["lr"].help in fields["learning_rate"].metadata["help"]


def test_the_trainer_factory_takes_lions_arguments_from_the_table():
    from lion_hf.trainer import lion_optimizer_cls_and_kwargs

    _, kwargs = lion_optimizer_cls_and_kwargs(lr=1e-3)
    assert kwargs == {"lr": 1e-3}
    with pytest.raises(ValueError, match="allowed: " + str(sorted(set(OPTIONS) - set(NOT_LION_ARGUMENTS)))
                       .replace("[", r"\[")
                       .replace("]", r"\]")):
        lion_optimizer_cls_and_kwargs(lr=1e-3, eps=1e-8)


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if o.choices and o.choices != (False, True)])
def test_validation_allows_exactly_the_tables_choices(name):
    option = OPTIONS[name]
    group = {key: OPTIONS[key].default for key in GROUP_OPTIONS}
    for value in (*option.choices, "not-a-choice"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if value == "not-a-choice":
                with pytest.raises(ValueError, match=f"{name} must be one of"):
                    _set(name, value, group)
            else:
                _set(name, value, group)


def _set(name, value, group):
    if name in GROUP_OPTIONS:
        validate_group({**group, name: value})
    elif name == "vote":
        DistributedLion([torch.nn.Parameter(torch.zeros(1))], vote=value)
    else:
        validate_options(**{name: value})
