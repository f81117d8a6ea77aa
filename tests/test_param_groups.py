"""Decay / no-decay grouping: HF's rule plus timm's "no decay below 2-D", trainable params only."""

import pytest
import torch
from torch import nn

from lion_hf.param_groups import decay_parameter_names, lion_param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)  # BERT's spelling
        self.final_norm = nn.Module()  # an RMSNorm-like module: its weight is caught by the name
        self.final_norm.weight = nn.Parameter(torch.ones(4))
        self.scale = nn.Parameter(torch.ones(4))  # 1-D without a telling name: timm's rule catches it
        self.mixer = nn.Parameter(torch.zeros(2, 4))  # 2-D, no pattern: decayed
        self.head = nn.Linear(4, 2, bias=False)


def test_decay_names_follow_hf_patterns_and_dimension():
    assert decay_parameter_names(Block()) == {"embed.weight", "proj.weight", "mixer", "head.weight"}


def test_groups_split_by_decay_and_drop_frozen_params():
    model = Block()
    model.head.weight.requires_grad_(False)
    groups = lion_param_groups(model, 0.1)
    by_id = {id(p): name for name, p in model.named_parameters()}
    named = [{by_id[id(p)] for p in g["params"]} for g in groups]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert named[0] == {"embed.weight", "proj.weight", "mixer"}
    assert named[1] == {"proj.bias", "LayerNorm.weight", "LayerNorm.bias", "final_norm.weight", "scale"}


def test_explicit_decay_names_override_the_rule_but_never_decay_1d():
    model = Block()
    groups = lion_param_groups(model, 0.2, decay_names={"proj.weight", "proj.bias"})
    assert groups[0]["params"] == [model.proj.weight]  # proj.bias is 1-D: still not decayed
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_empty_group_is_dropped():
    model = nn.Sequential(nn.LayerNorm(3))
    groups = lion_param_groups(model, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_bad_input():
    with pytest.raises(ValueError, match="weight_decay"):
        lion_param_groups(Block(), -0.1)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lion_param_groups(frozen, 0.1)


def test_zero3_partitioned_params_keep_their_real_dims():
    model = Block()
    for p in model.parameters():  # what DeepSpeed ZeRO-3 leaves: an empty shard + ds_shape
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert decay_parameter_names(model) == {"embed.weight", "proj.weight", "mixer", "head.weight"}


def test_flattened_params_fall_back_to_names_with_a_warning():
    model = Block()
    for p in model.parameters():  # FSDP1-style flat views
        p.data = p.data.reshape(-1)
    names = {"embed.weight", "proj.weight", "mixer", "head.weight"}
    with pytest.warns(UserWarning, match="every trainable parameter is 1-D"):
        groups = lion_param_groups(model, 0.1, decay_names=names)
    by_id = {id(p): name for name, p in model.named_parameters()}
    assert {by_id[id(p)] for p in groups[0]["params"]} == names
