"""Sparse gradients (``nn.Embedding(sparse=True)``) stepped a chunk of dense rows at a time, and
gradient release's ``sparse_embedding`` (the input embedding's gradient made sparse in the backwards
the release steps).

Each must compute the bits of the ordinary step on the dense gradient of the same lookup, in every
impl that runs on the CPU, for every weight and momentum dtype, and hold no dense gradient of the
embedding's size.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import warnings

import pytest
import torch
from optim_helpers import release_trainer_args  # tests/ is on sys.path under pytest
from tiny_models import CausalTokens, TokenDataset, tiny_bert, tiny_llama  # tests/ is on sys.path under pytest

import lion_hf.optim.dispatch as dispatch
import lion_hf.optim.numerics as numerics
from lion_hf import GradientRelease, Lion, LionTrainer
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


def test_the_skip_step_gate_judges_the_rows_a_sparse_gradient_sums_to():
    # fp16 entries that are finite alone but overflow when their row is summed: the dense gradient
    # is inf, so skip_step skips (and raise raises) as it does on the dense gradient.
    for policy in ("skip_step", "raise"):
        grads = []
        for sparse in (False, True):
            emb = torch.nn.Embedding(10, 2, sparse=sparse).half()
            opt = Lion(emb.parameters(), lr=1e-2, nonfinite_grad=policy, impl="foreach")
            before = emb.weight.detach().clone()
            emb(torch.tensor([3, 3, 3])).backward(torch.full((3, 2), 30000.0, dtype=torch.float16))
            grads.append(emb.weight.grad)
            if policy == "raise":
                with pytest.raises(RuntimeError, match="NaN or inf"):
                    opt.step()
            else:
                opt.step()
            assert torch.equal(emb.weight, before)
        assert grads[1].is_sparse and torch.isinf(grads[0]).any()


# --------------------------------------------------------------------------------------
# Gradient release: sparse_embedding
# --------------------------------------------------------------------------------------


def _train_llama(release: bool, *, impl="foreach", dtype=torch.float32, state_dtype="fp32", accumulation=1,
                 steps=3, record=None, model=None):
    model = tiny_llama().to(dtype) if model is None else model
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl, state_dtype=state_dtype)
    micro = 0
    handle = None
    if record is not None:  # what reaches the hooks (before the release's): the embedding's gradient's layout
        model.model.embed_tokens.weight.register_post_accumulate_grad_hook(lambda q: record.append(q.grad.layout))
    if release:
        handle = GradientRelease(opt, last_micro_batch=lambda: (micro + 1) % accumulation == 0)
        assert handle.sparse_embedding(model)
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
def test_release_with_a_sparse_embedding_trains_the_ordinary_run_bit_for_bit(small_chunks, impl, dtype, state_dtype,
                                                                              accumulation):
    record = []
    ordinary, _ = _train_llama(False, impl=impl, dtype=dtype, state_dtype=state_dtype, accumulation=accumulation)
    released, handle = _train_llama(True, impl=impl, dtype=dtype, state_dtype=state_dtype,
                                    accumulation=accumulation, record=record)
    assert handle.steps == 3
    start = tiny_llama().to(dtype)
    assert not torch.equal(released.model.embed_tokens.weight, start.model.embed_tokens.weight)
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in released.parameters())
    # Sparse in each step's one backward; under accumulation dense, added up as without release.
    assert set(record) == ({torch.sparse_coo} if accumulation == 1 else {torch.strided})
    assert len(record) == 3 * accumulation
    assert released.model.embed_tokens.sparse is False  # as built, between steps


def test_the_embedding_is_never_handed_over_as_a_whole_dense_gradient(small_chunks, monkeypatch):
    model = tiny_llama()
    embedding = model.model.embed_tokens.weight.data_ptr()
    handed = []
    original = dispatch._IMPL_FUNCTIONS["foreach"]

    def recording(groups, **kwargs):
        handed.extend(g.numel() for group in groups for p, g in zip(group.params, group.grads)
                      if p.untyped_storage().data_ptr() == embedding)
        return original(groups, **kwargs)

    monkeypatch.setitem(dispatch._IMPL_FUNCTIONS, "foreach", recording)
    _train_llama(True, steps=1, model=model)
    # 300 x 32: chunks of at most 500 elements (15 rows), never the 9,600 of the whole tensor.
    assert handed and max(handed) <= 500 and sum(handed) == 300 * 32


def test_sparse_embedding_takes_what_it_can_step_exactly_and_remove_restores_it():
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    assert release.sparse_embedding(model) and release.sparse_embedding(model)  # once
    embedding = model.model.embed_tokens
    assert len(embedding._forward_pre_hooks) == 1
    release.remove()
    assert not embedding._forward_pre_hooks and embedding.sparse is False
    # Tied weights, a frozen weight, one this optimizer does not train, max_norm, or a model without
    # HF's accessor: not taken.
    tied = tiny_llama(tied=True)
    assert not GradientRelease(Lion(tied.parameters())).sparse_embedding(tied)
    frozen = tiny_llama()
    frozen.model.embed_tokens.weight.requires_grad_(False)
    assert not GradientRelease(Lion(p for p in frozen.parameters() if p.requires_grad)).sparse_embedding(frozen)
    other = tiny_llama()
    assert not GradientRelease(Lion([other.lm_head.weight])).sparse_embedding(other)
    clipped = tiny_llama()
    clipped.model.embed_tokens.max_norm = 1.0
    assert not GradientRelease(Lion(clipped.parameters())).sparse_embedding(clipped)
    plain = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    assert not GradientRelease(Lion(plain.parameters())).sparse_embedding(plain)
    classifier = tiny_bert()
    assert GradientRelease(Lion(classifier.parameters())).sparse_embedding(classifier)


def test_outside_a_released_step_the_embedding_gradient_is_dense():
    # Paused release, no grad, torch.compile's tracing, more tokens than the embedding has rows.
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    release.sparse_embedding(model)
    ids = CausalTokens().ids[:2]
    with torch.no_grad():
        assert model(input_ids=ids).logits.grad_fn is None
    with release.paused():
        model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad.layout == torch.strided
    release.remove()
    for case in ("compiled", "many tokens"):
        model = tiny_llama()
        release = GradientRelease(Lion(model.parameters(), lr=1e-3))
        release.sparse_embedding(model)
        layouts = []
        model.model.embed_tokens.weight.register_post_accumulate_grad_hook(
            lambda q, layouts=layouts: layouts.append(q.grad.layout))
        if case == "compiled":
            run = torch.compile(model, backend="eager")
            ids = CausalTokens().ids[:2]
        else:
            run = model
            ids = CausalTokens(n=20, length=16).ids  # 320 tokens, 300 rows: a sparse gradient would be larger
        run(input_ids=ids, labels=ids).loss.backward()
        assert layouts == [torch.strided], case


def test_a_model_with_a_sparse_embedding_copies_and_pickles_as_a_plain_model():
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    release.sparse_embedding(model)
    _ = model(input_ids=CausalTokens().ids[:2], labels=CausalTokens().ids[:2]).loss.backward()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        # The copy carries no release: its embedding stays dense, and AdamW (no sparse support) trains it.
        opt = torch.optim.AdamW(clone.parameters(), lr=1e-3)
        ids = CausalTokens().ids[2:4]
        clone(input_ids=ids, labels=ids).loss.backward()
        assert clone.model.embed_tokens.weight.grad.layout == torch.strided
        opt.step()


def test_two_lookups_before_one_backward_warn():
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    release.sparse_embedding(model)
    ids = CausalTokens().ids[:2]
    with pytest.warns(UserWarning, match="looked up more than once before one backward"):
        (model(input_ids=ids, labels=ids).loss + model(input_ids=ids, labels=ids).loss).backward()
    assert release.steps == 1 and all(p.grad is None for p in model.parameters())


def test_a_forward_without_backward_leaves_a_plain_dense_model():
    model = tiny_llama()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    release.sparse_embedding(model)
    ids = CausalTokens().ids[:2]
    model(input_ids=ids).logits.sum()  # gradients on, no backward (a callback, a notebook cell)
    assert model.model.embed_tokens.sparse is False
    clone = copy.deepcopy(model)
    clone(input_ids=ids, labels=ids).loss.backward()
    assert clone.model.embed_tokens.weight.grad.layout == torch.strided
    model(input_ids=ids, labels=ids).loss.backward()
    assert release.steps == 1 and all(p.grad is None for p in model.parameters())


def test_a_loop_that_marks_the_last_micro_batch_after_the_forward_steps_the_ordinary_update(small_chunks):
    # last_micro_batch is asked at the lookup too; a loop that sets its flag between forward and
    # backward gets a stale answer there, and the sparse gradient of a micro-batch that is not the
    # last is made the dense gradient of its lookup, bit for bit, before the next one adds to it.
    def run(release: bool):
        model = tiny_llama()
        opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl="foreach")
        last = True
        if release:
            GradientRelease(opt, last_micro_batch=lambda: last).sparse_embedding(model)
        data = CausalTokens()
        for micro in range(6):
            ids = data.ids[2 * micro:2 * micro + 2]
            loss = model(input_ids=ids, labels=ids).loss / 2
            last = micro % 2 == 1
            loss.backward()
            if last:
                opt.step()
                opt.zero_grad()
        return model, opt

    (ordinary, ordinary_opt), (released, released_opt) = run(False), run(True)
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(ordinary_opt.state[p]["exp_avg"], released_opt.state[q]["exp_avg"]), name


def test_a_weight_also_used_outside_its_module_warns_and_turns_dense():
    # An output head that multiplies by the embedding's weight directly (not a registered tie).
    class SharedHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = torch.nn.Embedding(500, 8)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, ids):
            return self.embed(ids) @ self.embed.weight.t()

    model = SharedHead()
    release = GradientRelease(Lion(model.parameters(), lr=1e-3))
    assert release.sparse_embedding(model)
    ids = torch.randint(0, 500, (2, 5))
    with pytest.warns(UserWarning, match="also used outside its module"):
        model(ids).sum().backward()
    layouts = []
    model.embed.weight.register_post_accumulate_grad_hook(lambda q: layouts.append(q.grad.layout))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids).sum().backward()
    assert layouts == [torch.strided] and not model.embed._forward_pre_hooks


def test_two_releases_over_the_same_params_are_refused():
    model = tiny_bert()
    first = GradientRelease(Lion(model.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="already stepped in backward by the GradientRelease of another optimizer"):
        GradientRelease(Lion(model.parameters(), lr=1e-3))
    first.remove()
    GradientRelease(Lion(model.parameters(), lr=1e-3))


def test_lion_trainer_release_makes_the_word_embedding_sparse_when_asked(tmp_path):
    runs = {}
    for name, kw in (("ordinary", {}), ("dense", dict(lion_gradient_release=True)),
                     ("sparse", dict(lion_gradient_release=True, lion_sparse_embedding=True))):
        model = tiny_bert(vocab=1000)  # more rows than a batch has tokens: a sparse gradient is the smaller
        layouts = []
        model.bert.embeddings.word_embeddings.weight.register_post_accumulate_grad_hook(
            lambda q, layouts=layouts: layouts.append(q.grad.layout))
        trainer = LionTrainer(model=model, args=release_trainer_args(tmp_path / name, **kw),
                              train_dataset=TokenDataset())
        trainer.train()
        runs[name] = trainer, set(layouts)
    assert runs["sparse"][1] == {torch.sparse_coo}
    assert runs["dense"][1] == runs["ordinary"][1] == {torch.strided}
    for name in ("sparse", "dense"):
        for (label, p), q in zip(runs["ordinary"][0].model.named_parameters(), runs[name][0].model.parameters()):
            assert torch.equal(p, q), (name, label)
    with pytest.raises(ValueError, match="lion_sparse_embedding must be one of"):
        release_trainer_args(tmp_path, lion_gradient_release=True, lion_sparse_embedding="sometimes")
    with pytest.raises(ValueError, match="lion_sparse_embedding=True needs lion_gradient_release=True"):
        release_trainer_args(tmp_path, lion_sparse_embedding=True)
    # A model whose embedding cannot be taken (tied to its output layer) trains dense, with a warning.
    tied = LionTrainer(model=tiny_llama(tied=True), train_dataset=CausalTokens(),
                       args=release_trainer_args(tmp_path / "tied", lion_gradient_release=True,
                                                 lion_sparse_embedding=True))
    with pytest.warns(UserWarning, match="input embedding cannot be made sparse"):
        tied.train()


def test_a_second_lion_trainer_on_the_same_model_steps_each_param_once(tmp_path):
    # The first Trainer's release comes off when its train() ends: the second one's run is what a
    # fresh model with the first run's weights trains to.
    model = tiny_bert()
    kw = dict(lion_gradient_release=True, lion_sparse_embedding=True)
    first = LionTrainer(model=model, args=release_trainer_args(tmp_path / "a", **kw), train_dataset=TokenDataset())
    first.train()
    assert not first.gradient_release.active
    assert not model.bert.embeddings.word_embeddings._forward_pre_hooks
    fresh = tiny_bert()
    fresh.load_state_dict(model.state_dict())
    second = LionTrainer(model=model, args=release_trainer_args(tmp_path / "b", **kw), train_dataset=TokenDataset())
    second.train()
    alone = LionTrainer(model=fresh, args=release_trainer_args(tmp_path / "c", **kw), train_dataset=TokenDataset())
    alone.train()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
