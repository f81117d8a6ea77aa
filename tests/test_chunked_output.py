"""The output layer's weight gradient a range of rows at a time (ChunkedOutputGrad): under gradient
release each range is stepped as it is computed, and a released run computes the ordinary run's bits."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from optim_helpers import release_trainer_args  # tests/ is on sys.path under pytest
from tiny_models import CausalTokens, tiny_bert, tiny_llama  # tests/ is on sys.path under pytest

import lion_hf.optim.dispatch as dispatch
import lion_hf.optim.numerics as numerics
from lion_hf import ChunkedOutputGrad, GradientRelease, Lion, LionTrainer
from lion_hf.optim import impl_unavailable
from lion_hf.optim.numerics import row_chunks
from lion_hf.trainer import check_chunked_output

IMPLS = [pytest.param(impl, marks=pytest.mark.skipif(impl_unavailable(impl, "cpu") is not None,
                                                     reason=f"{impl} cannot run here"))
         for impl in ("for_loop", "foreach", "cpp")]


@pytest.fixture
def small_chunks(monkeypatch):
    """Ranges of a few hundred elements, so that the 300 x 32 output layer is cut into many."""
    monkeypatch.setattr(numerics, "ROW_CHUNK_NUMEL", 500)


def _train(release: bool, *, impl="foreach", dtype=torch.float32, state_dtype="fp32", accumulation=1, steps=3,
           chunked=True, cautious=False, model=None):
    model = tiny_llama().to(dtype) if model is None else model
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1, impl=impl, state_dtype=state_dtype, cautious=cautious)
    handle = ChunkedOutputGrad(model) if chunked else None
    handed_whole = []  # the output layer's gradients autograd accumulated (none while each range is stepped)
    model.lm_head.weight.register_post_accumulate_grad_hook(
        lambda q: handed_whole.append(q.grad.shape) if q.grad is not None else None)
    micro = 0
    if release:
        GradientRelease(opt, last_micro_batch=lambda: (micro + 1) % accumulation == 0)
    data = CausalTokens()
    for micro in range(steps * accumulation):
        ids = data.ids[2 * micro:2 * micro + 2]
        (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if (micro + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad()
    return model, handle, handed_whole


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("dtype", "state_dtype"), [(torch.float32, "fp32"), (torch.bfloat16, "int8"),
                                                    (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_release_with_a_chunked_output_trains_the_ordinary_run_bit_for_bit(small_chunks, impl, dtype, state_dtype,
                                                                           accumulation):
    ordinary, _, ordinary_whole = _train(False, impl=impl, dtype=dtype, state_dtype=state_dtype,
                                         accumulation=accumulation)
    released, _, released_whole = _train(True, impl=impl, dtype=dtype, state_dtype=state_dtype,
                                         accumulation=accumulation)
    start = tiny_llama().to(dtype)
    assert not torch.equal(released.lm_head.weight, start.lm_head.weight)
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in released.parameters())
    assert len(ordinary_whole) == 3 * accumulation
    # Released: stepped in ranges at each step's one backward; under accumulation every micro-batch's
    # gradient is whole, added up in .grad as without release, and the sum stepped by the hook.
    assert len(released_whole) == (0 if accumulation == 1 else 3 * accumulation)


def test_under_cautious_the_ranges_make_the_whole_gradient_first(small_chunks):
    # Cautious rescales by a mean over the whole tensor: the release hands it the ranges' products
    # joined, the ordinary run's gradient.
    ordinary, _, _ = _train(False, cautious=True)
    released, _, whole = _train(True, cautious=True)
    assert whole == []
    for (name, p), q in zip(ordinary.named_parameters(), released.parameters()):
        assert torch.equal(p, q), name


def test_the_output_layer_is_stepped_a_range_of_rows_at_a_time(small_chunks, monkeypatch):
    model = tiny_llama()
    weight = model.lm_head.weight.data_ptr()
    handed = []
    original = dispatch._IMPL_FUNCTIONS["foreach"]

    def recording(groups, **kwargs):
        handed.extend(g.shape[0] for group in groups for p, g in zip(group.params, group.grads)
                      if p.untyped_storage().data_ptr() == weight)
        return original(groups, **kwargs)

    monkeypatch.setitem(dispatch._IMPL_FUNCTIONS, "foreach", recording)
    _train(True, steps=1, model=model)
    # 300 rows of 32: ranges of 16 rows (500 elements rounded to whole 8-bit blocks), never all 300.
    assert handed == [last - first for first, last in row_chunks((300, 32), True)]
    assert max(handed) == 16 and sum(handed) == 300


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_gradient_is_the_layers_gradient(small_chunks, dtype):
    # Without release the ranges are joined into the whole gradient: the product the layer's own
    # backward computes (rounded by the BLAS per range), and the input's gradient is its own.
    torch.manual_seed(0)
    plain = tiny_llama().to(dtype)
    chunked = copy.deepcopy(plain)
    ChunkedOutputGrad(chunked)
    ids = CausalTokens().ids[:2]
    for model in (plain, chunked):
        model(input_ids=ids, labels=ids).loss.backward()
    assert chunked.lm_head.weight.grad.shape == plain.lm_head.weight.grad.shape
    torch.testing.assert_close(chunked.lm_head.weight.grad, plain.lm_head.weight.grad)
    torch.testing.assert_close(chunked.model.norm.weight.grad, plain.model.norm.weight.grad)


def test_chunked_output_takes_what_it_can_compute_exactly_and_remove_restores_it():
    model = tiny_llama()
    handle = ChunkedOutputGrad(model)
    assert handle.active and "forward" in vars(model.lm_head)
    with pytest.raises(ValueError, match="already taken"):
        ChunkedOutputGrad(model)
    handle.remove()
    assert not handle.active and "forward" not in vars(model.lm_head)
    assert ChunkedOutputGrad.unavailable(model) is None
    tied = tiny_llama(tied=True)
    assert "tied" in ChunkedOutputGrad.unavailable(tied)
    frozen = tiny_llama()
    frozen.lm_head.weight.requires_grad_(False)
    assert "frozen" in ChunkedOutputGrad.unavailable(frozen)
    biased = tiny_llama()
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(300))
    assert "bias" in ChunkedOutputGrad.unavailable(biased)
    assert "no output layer" in ChunkedOutputGrad.unavailable(tiny_bert())
    assert "no output layer" in ChunkedOutputGrad.unavailable(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"cannot take this model's output layer: .*tied"):
        ChunkedOutputGrad(tied)


def test_a_backward_that_does_not_want_the_weights_gradient_leaves_the_layer_alone(small_chunks):
    # torch.autograd.grad over the hidden states, or backward(inputs=...) without the weight: the
    # release must not step the output layer (its gradient is not part of this backward).
    model = tiny_llama()
    opt = Lion(model.parameters(), lr=1e-2)
    ChunkedOutputGrad(model)
    release = GradientRelease(opt)
    before = model.lm_head.weight.detach().clone()
    ids = CausalTokens().ids[:2]
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    torch.autograd.grad(out.loss, [out.hidden_states[-1]])
    model(input_ids=ids, labels=ids).loss.backward(inputs=[model.model.norm.weight])
    assert torch.equal(model.lm_head.weight, before)
    assert model.lm_head.weight.grad is None and release.steps == 1  # the second backward stepped the norm alone


@pytest.mark.parametrize("state_dtype", ["fp32", "int8"])
def test_a_layer_called_twice_in_one_backward_steps_the_summed_gradient(small_chunks, state_dtype):
    # A loss over two slices of the sequence calls the layer twice: each call's gradient is whole,
    # autograd adds them, and the hook steps the sum, as in the ordinary run.
    runs = []
    for release in (False, True):
        model = tiny_llama().to(torch.bfloat16)
        opt = Lion(model.parameters(), lr=1e-2, state_dtype=state_dtype)
        ChunkedOutputGrad(model)
        if release:
            GradientRelease(opt)
        ids = CausalTokens().ids[:2]
        for _ in range(2):
            hidden = model.model(input_ids=ids).last_hidden_state
            loss = sum(torch.nn.functional.cross_entropy(model.lm_head(h).flatten(0, 1).float(), t.flatten())
                       for h, t in ((hidden[:, :8], ids[:, 1:9]), (hidden[:, 8:-1], ids[:, 9:])))
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append(model)
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(p, q), name


def test_copies_and_pickles_of_a_taken_model_run_the_layers_own_forward():
    model = tiny_llama()
    ChunkedOutputGrad(model)
    ids = CausalTokens().ids[:1]
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        out = other(input_ids=ids)
        assert type(out.logits.grad_fn).__name__ != "_OutputRowsBackward"
        assert torch.equal(out.logits, model(input_ids=ids).logits)
        assert ChunkedOutputGrad.unavailable(other) is None  # and a copy can be taken itself
    assert type(model(input_ids=ids).logits.grad_fn).__name__ == "_OutputRowsBackward"


def test_without_gradients_or_under_autocast_the_layers_own_forward_runs():
    model = tiny_llama()
    ChunkedOutputGrad(model)
    ids = CausalTokens().ids[:1]
    with torch.no_grad():
        assert model(input_ids=ids).logits.grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16 and type(logits.grad_fn).__name__ != "_OutputRowsBackward"


def test_apply_step_by_rows_refuses_ranges_it_cannot_step_exactly():
    p = torch.zeros(256, 32)  # 8192 elements: 8-bit momentum, a block every 8 rows
    opt = Lion([p], state_dtype="int8")
    stand_in = torch.zeros(()).expand_as(p)
    prepared = dispatch.prepare_step([opt.step_group(0, [p], [stand_in])], impl="foreach",
                                     nonfinite_grad="skip_elements")
    def rows(a, b):
        return torch.ones(b - a, 32)

    for bad in ([(0, 32), (33, 256)], [(0, 256), (256, 256)], [(0, 32)], [], [(0, 4), (4, 256)]):
        with pytest.raises(ValueError, match=r"ranges must|block of 256"):
            dispatch.apply_step_by_rows(prepared, rows, bad)
    with pytest.raises(ValueError, match=r"grad_rows\(0, 8\) must return a dense tensor of shape \(8, 32\)"):
        dispatch.apply_step_by_rows(prepared, lambda a, b: torch.ones(b - a, 16), [(0, 8), (8, 256)])
    with pytest.raises(ValueError, match=r"torch.float32 on cpu; got Tensor of shape .* torch.float64"):
        dispatch.apply_step_by_rows(prepared, lambda a, b: torch.ones(b - a, 32, dtype=torch.float64), [(0, 256)])
    assert torch.all(p == 0)
    dispatch.apply_step_by_rows(prepared, rows, zip((0, 8), (8, 256)))  # any iterable of pairs
    assert torch.all(p == -1e-4)  # lr 1e-4, sign(+1): every row stepped once


def _trainer_args(tmp_path, **overrides):
    return release_trainer_args(tmp_path, **{"per_device_train_batch_size": 4, "max_steps": 4, **overrides})


def test_lion_trainer_chunked_output_with_and_without_release(tmp_path):
    runs = {}
    for name, kw in (("ordinary", {}), ("chunked", dict(lion_chunked_output_grad=True)),
                     ("released", dict(lion_chunked_output_grad=True, lion_gradient_release=True,
                                       lion_sparse_embedding=True))):
        model = tiny_llama()
        whole = []
        model.lm_head.weight.register_post_accumulate_grad_hook(
            lambda q, whole=whole: whole.append(1) if q.grad is not None else None)
        trainer = LionTrainer(model=model, args=_trainer_args(tmp_path / name, **kw), train_dataset=CausalTokens())
        trainer.train()
        runs[name] = model, len(whole)
        assert "forward" not in vars(model.lm_head)  # taken for train() only
    assert runs["ordinary"][1] == runs["chunked"][1] == 4 and runs["released"][1] == 0
    for name in ("chunked", "released"):
        for (label, p), q in zip(runs["ordinary"][0].named_parameters(), runs[name][0].parameters()):
            torch.testing.assert_close(p, q, msg=f"{name} {label}")
    for (label, p), q in zip(runs["chunked"][0].named_parameters(), runs["released"][0].parameters()):
        assert torch.equal(p, q), label
    with pytest.raises(ValueError, match="lion_chunked_output_grad must be one of"):
        _trainer_args(tmp_path, lion_chunked_output_grad="yes")
    for engine in ("deepspeed", "fsdp"):
        with pytest.raises(ValueError, match="lion_chunked_output_grad=True cannot run under"):
            check_chunked_output(_trainer_args(tmp_path, lion_chunked_output_grad=True),
                                 deepspeed=engine == "deepspeed", fsdp=engine == "fsdp")
    tied = LionTrainer(model=tiny_llama(tied=True), train_dataset=CausalTokens(),
                       args=_trainer_args(tmp_path / "tied", lion_chunked_output_grad=True))
    with pytest.warns(UserWarning, match="lion_chunked_output_grad=True does nothing here: its output layer's weight"):
        tied.train()
    mixed = LionTrainer(model=tiny_llama(), train_dataset=CausalTokens(),
                        args=_trainer_args(tmp_path / "mixed", lion_chunked_output_grad=True, bf16=True))
    with pytest.warns(UserWarning, match="does nothing here: under mixed precision"):
        mixed.train()
    assert "forward" not in vars(mixed.model.lm_head)
