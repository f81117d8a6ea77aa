"""Gradients that are never whole: sparse gradients (``nn.Embedding(sparse=True)``) stepped a chunk of
dense rows at a time, and gradient release's ``chunk_embeddings`` (the input embedding made sparse,
the output layer's weight stepped in rows during backward).

Each must compute the bits of the ordinary step on the whole dense gradient, in every impl that runs
on the CPU, for every weight and momentum dtype, and hold no gradient of the tensor's size.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from tiny_models import CausalTokens, tiny_bert, tiny_llama  # tests/ is on sys.path under pytest

import lion_hf.optim.dispatch as dispatch
import lion_hf.optim.numerics as numerics
from lion_hf import GradientRelease, Lion, LionTrainer, LionTrainingArguments
from lion_hf.optim import impl_unavailable
from lion_hf.optim.numerics import EIGHT_BIT_BLOCK, row_chunks, sparse_rows

IMPLS = [pytest.param(impl, marks=pytest.mark.skipif(impl_unavailable(impl, "cpu") is not None,
                                                     reason=f"{impl} cannot run here"))
         for impl in ("for_loop", "foreach", "cpp")]
# (weights, momentum, param_rounding): fp32, pure bf16, and 8-bit momenta under each rounding of
# low-precision weights.
SETUPS = [(torch.float32, "fp32", "stochastic"), (torch.bfloat16, "bf16", "stochastic"),
          (torch.bfloat16, "int8", "stochastic"), (torch.bfloat16, "int8", "kahan"),
          (torch.float16, "int8", "nearest")]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred elements, so that the test tensors are cut into many."""
    monkeypatch.setattr(numerics, "ROW_CHUNK_NUMEL", 500)


def _embedding_grads(dtype, padding_idx=None, rows=3000, dim=40):
    """The dense gradient of one embedding lookup and the sparse gradient of the same lookup."""
    torch.manual_seed(0)
    dense = torch.nn.Embedding(rows, dim, padding_idx=padding_idx).to(dtype)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    # Repeated tokens (each of the first 20 rows many times) and scattered ones.
    ids = torch.cat([torch.randint(0, 20, (4, 200)), torch.randint(0, rows, (4, 200))], 1)
    upstream = torch.randn(4, 400, dim, dtype=dtype)
    dense(ids).backward(upstream)
    sparse(ids).backward(upstream)
    return dense.weight.grad, sparse.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_sparse_rows_are_the_dense_embedding_gradients_rows(small_chunks, dtype, padding_idx):
    dense, sparse = _embedding_grads(dtype, padding_idx)
    assert sparse.is_sparse and not sparse.is_coalesced()
    for eight_bit in (False, True):
        chunks = row_chunks(sparse.shape, eight_bit)
        assert len(chunks) > 10 and chunks[0][0] == 0 and chunks[-1][1] == sparse.shape[0]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
        if eight_bit:  # each chunk starts on a block of the 8-bit momentum
            assert all(start * sparse.shape[1] % EIGHT_BIT_BLOCK == 0 for start, _ in chunks)
        rebuilt = torch.cat([sparse_rows(sparse, start, stop) for start, stop in chunks])
        assert rebuilt.dtype == dtype and torch.equal(rebuilt, dense)
    coalesced = sparse.coalesce()
    assert torch.equal(sparse_rows(coalesced, 0, coalesced.shape[0]), coalesced.to_dense())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("dtype", "state_dtype", "rounding"), SETUPS)
def test_a_sparse_gradient_steps_as_its_dense_form_bit_for_bit(small_chunks, impl, dtype, state_dtype, rounding):
    torch.manual_seed(0)
    dense = torch.nn.Embedding(3000, 40).to(dtype)
    sparse = copy.deepcopy(dense)
    sparse.sparse = True
    kw = dict(lr=1e-3, weight_decay=0.1, impl=impl, state_dtype=state_dtype, param_rounding=rounding)
    opts = Lion(dense.parameters(), **kw), Lion(sparse.parameters(), **kw)
    for step in range(3):
        ids = torch.randint(0, 200, (8, 50))
        upstream = torch.randn(8, 50, 40, dtype=dtype)
        for module, opt in zip((dense, sparse), opts):
            torch.manual_seed(step)  # the same stochastic-rounding seeds
            module(ids).backward(upstream)
            opt.step()
            opt.zero_grad()
    assert not torch.equal(sparse.weight, _initial_weight(3000, 40).to(dtype))
    assert torch.equal(sparse.weight, dense.weight)
    dense_state, sparse_state = opts[0].state[dense.weight], opts[1].state[sparse.weight]
    assert dense_state.keys() == sparse_state.keys()
    for key in dense_state:
        assert torch.equal(dense_state[key], sparse_state[key]), key


def _initial_weight(rows, dim):
    torch.manual_seed(0)
    return torch.nn.Embedding(rows, dim).weight.detach()


def test_a_sparse_gradient_under_cautious_and_skip_elements(small_chunks):
    # cautious rescales by a mean over the whole tensor (stepped whole); a NaN entry is skipped in
    # its element only, as in the dense gradient.
    for cautious, poison in ((True, False), (False, True)):
        torch.manual_seed(0)
        dense = torch.nn.Embedding(1000, 8)
        sparse = copy.deepcopy(dense)
        sparse.sparse = True
        opts = [Lion(m.parameters(), lr=1e-2, cautious=cautious, impl="foreach") for m in (dense, sparse)]
        ids = torch.tensor([[1, 2, 2, 999]])
        upstream = torch.randn(1, 4, 8)
        if poison:
            upstream[0, 1, 3] = float("nan")
        for module, opt in zip((dense, sparse), opts):
            module(ids).backward(upstream)
            opt.step()
        assert torch.equal(sparse.weight, dense.weight)
        if poison:  # row 2 element 3 kept its value (its gradient is NaN); others moved
            assert torch.equal(sparse.weight[2, 3], _initial_weight(1000, 8)[2, 3])
            assert not torch.equal(sparse.weight[1], _initial_weight(1000, 8)[1])


# --------------------------------------------------------------------------------------
# Gradient release: chunk_embeddings
# --------------------------------------------------------------------------------------


def _train_llama(release: bool, *, impl="foreach", dtype=torch.float32, state_dtype="fp32", accumulation=1,
                 steps=3, record=None, model=None):
    model = tiny_llama().to(dtype) if model is None else model
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl, state_dtype=state_dtype)
    micro = 0
    handle = None
    if release:
        if record is not None:  # what reaches the hooks (before the release's): each gradient's layout
            for name, p in model.named_parameters():
                p.register_post_accumulate_grad_hook(
                    lambda q, name=name: record.append((name, None if q.grad is None else q.grad.layout)))
        handle = GradientRelease(opt, last_micro_batch=lambda: (micro + 1) % accumulation == 0)
        assert handle.chunk_embeddings(model) == ["input", "output"]
    data = CausalTokens()
    torch.manual_seed(1)
    for micro in range(steps * accumulation):
        ids = data.ids[2 * micro:2 * micro + 2]
        (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if (micro + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
    return model, handle


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("dtype", "state_dtype"), [(torch.float32, "fp32"), (torch.bfloat16, "int8"),
                                                    (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_chunked_release_trains_the_ordinary_run_bit_for_bit(small_chunks, impl, dtype, state_dtype, accumulation):
    record = []
    ordinary, _ = _train_llama(False, impl=impl, dtype=dtype, state_dtype=state_dtype, accumulation=accumulation)
    released, handle = _train_llama(True, impl=impl, dtype=dtype, state_dtype=state_dtype,
                                    accumulation=accumulation, record=record)
    assert handle.steps == 3
    start = tiny_llama().to(dtype)
    assert not torch.equal(released.lm_head.weight, start.lm_head.weight)
    assert not torch.equal(released.model.embed_tokens.weight, start.model.embed_tokens.weight)
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in released.parameters())
    layouts = {}
    for name, layout in record:
        layouts.setdefault(name, set()).add(layout)
    if accumulation == 1:
        # The output layer's weight never held a gradient (its hook runs with none); the embedding's was sparse.
        assert layouts["lm_head.weight"] == {None}
        assert layouts["model.embed_tokens.weight"] == {torch.sparse_coo}
    else:
        # Under accumulation both keep their dense gradients, added up as without release.
        assert layouts["lm_head.weight"] == {torch.strided}
        assert layouts["model.embed_tokens.weight"] == {torch.strided}


def test_chunked_release_never_holds_a_whole_gradient_of_either(small_chunks, monkeypatch):
    # Every gradient of the two tensors that the impl is handed is one chunk of their rows.
    model = tiny_llama()
    vocab_tensors = {model.lm_head.weight.data_ptr(), model.model.embed_tokens.weight.data_ptr()}
    handed = []
    original = dispatch._IMPL_FUNCTIONS["foreach"]

    def recording(groups, **kwargs):
        handed.extend(g.numel() for group in groups for p, g in zip(group.params, group.grads)
                      if p.untyped_storage().data_ptr() in vocab_tensors)
        return original(groups, **kwargs)

    monkeypatch.setitem(dispatch._IMPL_FUNCTIONS, "foreach", recording)
    _train_llama(True, steps=1, model=model)
    # 300 x 32 each: chunks of at most 500 elements (15 rows), never the 9,600 of a whole tensor.
    assert handed and max(handed) <= 500 and sum(handed) == 2 * 300 * 32


def test_chunk_embeddings_takes_what_it_can_chunk_exactly_and_remove_restores_it():
    model = tiny_llama()
    opt = Lion(model.parameters(), lr=1e-3)
    release = GradientRelease(opt)
    assert release.chunk_embeddings(model) == ["input", "output"]
    assert "forward" in vars(model.lm_head) and model.model.embed_tokens._forward_pre_hooks
    release.remove()
    assert "forward" not in vars(model.lm_head) and not model.model.embed_tokens._forward_pre_hooks
    assert model.model.embed_tokens.sparse is False
    # Tied weights (the output layer's gradient is dense anyway), a frozen or untrained weight, an
    # output layer with a bias, or a model without the HF accessors: nothing taken.
    tied = tiny_llama(tied=True)
    assert GradientRelease(Lion(tied.parameters())).chunk_embeddings(tied) == []
    frozen = tiny_llama()
    frozen.model.embed_tokens.weight.requires_grad_(False)
    assert GradientRelease(Lion(frozen.parameters())).chunk_embeddings(frozen) == ["output"]
    other = tiny_llama()
    only_head = Lion([other.lm_head.weight])  # the embedding is not this optimizer's
    assert GradientRelease(only_head).chunk_embeddings(other) == ["output"]
    biased = tiny_llama()
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(300))
    assert GradientRelease(Lion(biased.parameters())).chunk_embeddings(biased) == ["input"]
    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    assert GradientRelease(Lion(plain.parameters())).chunk_embeddings(plain) == []


def test_chunked_output_layer_outside_a_released_step_is_the_plain_layer():
    # No grad, paused release: the output layer's weight gets its ordinary dense gradient.
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    release.chunk_embeddings(model)
    ids = CausalTokens().ids[:2]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.grad_fn is None
    with release.paused():
        model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.layout == torch.strided
    assert model.model.embed_tokens.weight.grad.layout == torch.strided


def _trainer_args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1, learning_rate=1e-3,
                weight_decay=0.1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                lion_impl="foreach", disable_tqdm=True, max_grad_norm=0.0, bf16=False)
    base.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LionTrainingArguments(**base)


def test_lion_trainer_release_chunks_a_causal_lms_embeddings_and_trains_the_ordinary_run(tmp_path):
    runs = {}
    for release in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        trainer = LionTrainer(model=model, args=_trainer_args(tmp_path / str(release), lion_gradient_release=release,
                                                              lion_state_dtype="int8"),
                              train_dataset=CausalTokens())
        trainer.train()
        runs[release] = trainer
    released = runs[True]
    assert "forward" in vars(released.model.lm_head)  # the output layer was chunked
    assert released.model.model.embed_tokens._forward_pre_hooks
    assert [h["loss"] for h in released.state.log_history if "loss" in h] == \
           [h["loss"] for h in runs[False].state.log_history if "loss" in h]
    for (name, p), q in zip(runs[False].model.named_parameters(), released.model.parameters()):
        assert torch.equal(p, q), name


def test_release_of_a_classifier_makes_its_word_embedding_sparse():
    model = tiny_bert()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    assert release.chunk_embeddings(model) == ["input"]  # a classifier has no output embeddings
