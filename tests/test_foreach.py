"""impl="foreach" (lion_hf/optim/foreach.py): cache rounds, and the same arithmetic as for_loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from lion_hf import Lion
from lion_hf.optim import foreach


def _foreach_problem(nan_at: int | None):
    """fp32 params of mixed sizes, one non-contiguous, grads and momenta from a fixed seed."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(s, generator=gen) for s in [(5,), (40, 13), (1,), (300,), (3, 2)]]
    base.append(torch.randn(9, 11, generator=gen).t())  # a non-contiguous param
    grads = [torch.randn(b.shape, generator=gen) for b in base]
    grads[-1] = torch.randn(9, 11, generator=gen).t()
    if nan_at is not None:
        grads[1].view(-1)[nan_at] = float("nan")
        grads[3][7] = float("inf")
    return base, grads


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("nan_at", [None, 250])
def test_foreach_cache_rounds_change_no_bit(monkeypatch, maximize, nan_at):
    """Rounds that cut tensors mid-way (37 elements) give bit for bit what one whole-list pass
    gives, including the skip_elements masks, which are decided round by round."""
    results = []
    for round_size in (1 << 30, 37):
        monkeypatch.setattr(foreach, "FOREACH_CACHE_ROUND", round_size)
        base, grads = _foreach_problem(nan_at)
        params = [torch.nn.Parameter(b.clone()) for b in base]
        opt = Lion(params, lr=1e-2, weight_decay=0.1, impl="foreach", maximize=maximize)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in params])
    for (p_whole, m_whole), (p_rounds, m_rounds), b in zip(*results, _foreach_problem(nan_at)[0]):
        assert torch.equal(p_whole, p_rounds) and torch.equal(m_whole, m_rounds)
        assert not torch.equal(p_rounds, b), "a param did not move"
    if nan_at is not None:
        base, _ = _foreach_problem(nan_at)
        assert results[1][1][0].view(-1)[nan_at] == base[1].view(-1)[nan_at], "a NaN-grad element moved"
        assert results[1][3][0][7] == base[3][7], "an inf-grad element moved"
        assert torch.isfinite(results[1][1][1]).all() and torch.isfinite(results[1][3][1]).all()


def test_foreach_cache_rounds_cover_each_element_once(monkeypatch):
    monkeypatch.setattr(foreach, "FOREACH_CACHE_ROUND", 37)
    base, grads = _foreach_problem(None)
    moms = [torch.zeros_like(b) for b in base]
    rounds = foreach.cache_rounds(base, grads, moms)
    sizes = [sum(t.numel() for t in r[0]) for r in rounds]
    assert sum(sizes) == sum(b.numel() for b in base)
    assert all(s >= 37 for s in sizes[:-1]) and max(sizes) < 2 * 37 + 99  # 99: the non-contiguous piece
    seen = {}
    for ps, gs, ms, cs in rounds:
        assert cs == [None] * len(ps)
        for p, g, m in zip(ps, gs, ms):
            assert p.shape == g.shape == m.shape
            seen.setdefault(p.untyped_storage().data_ptr(), []).append((p.storage_offset(), p.numel()))
    for b in base:  # each param's pieces tile it without overlap
        spans = sorted(seen[b.untyped_storage().data_ptr()])
        assert spans[0][0] == 0 and sum(n for _, n in spans) == b.numel()
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in itertools.pairwise(spans))
