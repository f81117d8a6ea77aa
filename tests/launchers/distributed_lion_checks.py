"""DistributedLion's checks on several gloo CPU processes, in one launch to amortise start-up.

    python -m torch.distributed.run --nproc_per_node 2 tests/launchers/distributed_lion_checks.py OUT_DIR

Each rank saves ``OUT_DIR/rank{r}.pt``: a dict of check name -> what tests/test_distributed_lion.py
asserts (tensors recorded before and after steps, Lion's results on the same data, the collectives
each step called). Every check builds its own optimizer; the global seed is per rank where the
data must differ between ranks.
"""

import copy
import sys
import warnings

import torch
import torch.distributed as dist

from lion_hf import DistributedLion, Lion

SHAPES = [(7, 3), (11,), (4, 4), (1,), (0,)]  # 21 + 11 + 16 + 1 + 0 = 49 elements (not a multiple of 5)
COLLECTIVES = ["all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "scatter", "gather", "send", "recv", "isend", "irecv", "barrier"]


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def groups(params, wd=0.1):
    return [{"params": params[:3], "weight_decay": wd}, {"params": params[3:], "weight_decay": 0.0}]


def grads_for(rank, step, same, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + (0 if same else 17 * (rank + 1)))
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def snapshot(params):
    return [p.detach().clone() for p in params]


def record_step(opt, params, before, outcome, case):
    """One step into ``outcome``: "stepped" or the RuntimeError's text, and whether the params kept ``before``."""
    try:
        opt.step()
        outcome[case] = "stepped"
    except RuntimeError as exc:
        outcome[case] = str(exc)
    outcome[case + "_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, snapshot(params)))


def momenta(opt, params):
    return [opt.state[p]["exp_avg"].clone() for p in params]


def c_of(opt, params, grads, beta1):
    """Each tensor's c = beta1 * m + (1 - beta1) * g in fp32, as the optimizer computes it (before its step)."""
    out = []
    for p, g in zip(params, grads):
        m = opt.state[p]["exp_avg"].float() if p in opt.state else torch.zeros(p.shape)
        out.append(m * beta1 + g.float() * (1.0 - beta1))
    return out


class Recorder:
    """Wraps torch.distributed's collectives: (name, bytes of the tensors handed in) per call."""

    def __init__(self):
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                sent = 0
                tensors = list(args[1:2]) if _name in ("all_gather_into_tensor", "all_gather_single",
                                                       "reduce_scatter_tensor", "all_to_all_single") else list(args)
                for a in tensors:
                    if isinstance(a, torch.Tensor):
                        sent += a.numel() * a.element_size()
                    elif isinstance(a, (list, tuple)):
                        sent += sum(t.numel() * t.element_size() for t in a if isinstance(t, torch.Tensor))
                self.calls.append((_name, sent))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def check_same_data(rank):
    """Identical data on every rank: each vote equals Lion (foreach), weights and momenta, bit for bit."""
    out = {}
    for vote in ("majority", "average"):
        params, ref = make_params(), make_params()
        opt = DistributedLion(groups(params), lr=0.01, vote=vote, nonfinite_grad="skip_step")
        lion = Lion(groups(ref), lr=0.01, impl="foreach", nonfinite_grad="skip_step")
        for step in range(4):
            for p, q, g in zip(params, ref, grads_for(rank, step, same=True)):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            lion.step()
        out[vote] = {"params": snapshot(params), "lion": snapshot(ref), "m": momenta(opt, params),
                     "lion_m": momenta(lion, ref)}
    return out


def check_different_data(rank, dtype, vote, state_dtype="fp32", param_rounding="stochastic"):
    """Different data per rank: each step's c, weights before/after, grads and momenta, for the reference."""
    params = make_params(dtype)
    opt = DistributedLion(groups(params), lr=0.01, vote=vote, state_dtype=state_dtype, param_rounding=param_rounding)
    torch.manual_seed(rank)  # the ranks' global generators differ: the rounding seeds must not depend on them
    steps = []
    for step in range(3):
        grads = grads_for(rank, step, same=False, dtype=dtype)
        for p, g in zip(params, grads):
            p.grad = g
        c = c_of(opt, params, grads, 0.9)
        before = snapshot(params)
        m_before = [torch.zeros(p.shape) if p not in opt.state else opt.state[p]["exp_avg"].float().clone()
                    for p in params]
        opt.step()
        comps = [opt.state[p]["kahan_comp"].clone() if "kahan_comp" in opt.state[p] else None for p in params]
        steps.append({"c": c, "before": before, "after": snapshot(params), "grads": [g.clone() for g in grads],
                      "comps": comps,
                      "m_before": m_before, "m_after": [m.float() for m in momenta(opt, params)]})
    return steps


def sign_pattern(rank, world):
    """Per element: the sign this rank sends (see the test for the expected votes)."""
    return torch.tensor([0.0, 1.0 if rank % 2 == 0 else -1.0, 1.0 if rank == 0 else 0.0, -1.0,
                         1.0 if rank < world - 1 else -1.0])


def check_ties(rank, world):
    out = {}
    for vote in ("majority", "average"):
        p = torch.nn.Parameter(torch.zeros(5))
        opt = DistributedLion([p], lr=1.0, vote=vote)
        p.grad = sign_pattern(rank, world)
        opt.step()
        out[vote] = p.detach().clone()
    return out


def check_bytes(rank):
    # 1,177 elements: the 6 header bytes weigh little (49 elements would need 16 bytes, over 49 * 4 / 16).
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((37, 29), (101,), (3,))]
    opt = DistributedLion(groups(params), lr=0.01)
    per_step = []
    with Recorder() as rec:
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape)
            if step == 2 and rank == 1:
                params[0].grad[0, 0] = float("nan")  # the skip path sends the same one buffer
            before = len(rec.calls)
            opt.step()
            per_step.append(rec.calls[before:])
    return {"per_step": per_step, "numel": sum(p.numel() for p in params), "skipped": opt.skipped_steps}


def check_skip(rank):
    out = {}
    for how in ("grad", "norm"):
        params = make_params()
        opt = DistributedLion(groups(params), lr=0.01, nonfinite_grad="skip_step")
        for p, g in zip(params, grads_for(rank, 0, same=False)):
            p.grad = g
        opt.step()
        before, m_before = snapshot(params), momenta(opt, params)
        for p, g in zip(params, grads_for(rank, 1, same=False)):
            p.grad = g
        if rank == 1:
            if how == "grad":
                params[1].grad[3] = float("inf")
            else:
                opt.set_grad_norm(float("nan"))
        elif how == "norm":
            opt.set_grad_norm(1.0)
        opt.step()
        out[how] = {"before": before, "after": snapshot(params), "m_before": m_before, "m_after": momenta(opt, params),
                    "skipped": opt.skipped_steps}
    # "raise": every rank raises, nothing moves.
    params = make_params()
    opt = DistributedLion(groups(params), lr=0.01, nonfinite_grad="raise")
    for p, g in zip(params, grads_for(rank, 0, same=False)):
        p.grad = g
    if rank == 0:
        params[0].grad[0, 0] = float("nan")
    before = snapshot(params)
    try:
        opt.step()
        raised = False
    except RuntimeError:
        raised = True
    out["raise"] = {"raised": raised, "unchanged": all(torch.equal(a, b) for a, b in zip(before, params))}
    # "skip_elements": the bad element abstains on its rank and keeps its momentum there; weights agree.
    params = make_params()
    opt = DistributedLion(groups(params), lr=0.01, nonfinite_grad="skip_elements")
    for p, g in zip(params, grads_for(rank, 0, same=False)):
        p.grad = g
    opt.step()
    m_before = momenta(opt, params)
    grads = grads_for(rank, 1, same=False)
    if rank == 1:
        grads[1][3] = float("nan")
    for p, g in zip(params, grads):
        p.grad = g
    c = c_of(opt, params, grads, 0.9)
    before = snapshot(params)
    opt.step()
    out["skip_elements"] = {"c": c, "before": before, "after": snapshot(params), "m_before": m_before,
                            "m_after": momenta(opt, params), "skipped": opt.skipped_steps}
    return out


def check_resume(rank):
    """state_dict round trip per rank: stepping on after a reload equals stepping on without one."""
    params = make_params()
    opt = DistributedLion(groups(params), lr=0.01, vote="average")
    for step in range(2):
        for p, g in zip(params, grads_for(rank, step, same=False)):
            p.grad = g
        opt.step()
    saved_params, saved_state = snapshot(params), copy.deepcopy(opt.state_dict())
    for step in (2, 3):
        for p, g in zip(params, grads_for(rank, step, same=False)):
            p.grad = g
        opt.step()
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = DistributedLion(groups(resumed), lr=0.01, vote="average")
    opt2.load_state_dict(saved_state)
    for step in (2, 3):
        for p, g in zip(resumed, grads_for(rank, step, same=False)):
            p.grad = g
        opt2.step()
    return {"straight": snapshot(params), "resumed": snapshot(resumed), "m": momenta(opt, params),
            "m_resumed": momenta(opt2, resumed)}


def check_gradient_layouts(rank):
    """Ranks whose gradients cover different params: the same sizes swapped (rank 0 has a grad for
    the first (4, 4) param, rank 1 for the second), and one rank without a grad for one param. Every
    rank must raise the same RuntimeError, nothing updated, and the process group still usable."""
    outcome = {}
    for case in ("swapped", "missing"):
        params = [torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4, 4)),
                  torch.nn.Parameter(torch.randn(3))]
        before = snapshot(params)
        opt = DistributedLion(params, lr=0.01)
        for i, p in enumerate(params):
            if case == "swapped":
                keep = i == 2 or i == rank % 2
            else:
                keep = not (rank == 1 and i == 0)
            p.grad = torch.randn(p.shape) if keep else None
        record_step(opt, params, before, outcome, case)
    dist.barrier()  # the group survived both
    return outcome


def check_sparse(rank):
    """Every rank's embedding has a sparse gradient (nn.Embedding(sparse=True)): every rank raises
    the ValueError before any collective, nothing moves, and the group is still usable."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = DistributedLion(emb.parameters(), lr=0.01)
    emb(torch.tensor([1, 2 + rank])).sum().backward()
    try:
        opt.step()
        outcome = "stepped"
    except ValueError as exc:
        outcome = str(exc)
    dist.barrier()
    return {"outcome": outcome, "unchanged": torch.equal(emb.weight, before)}


# Options that shape the update, and rank 1's different value: every rank must raise (issue 34).
DISAGREEMENTS = {
    "lr": ({"lr": 0.01}, {"lr": 0.02}),
    "weight_decay": ({}, {"wd": 0.2}),
    "group_lr": ({}, {"group_lr": 0.03}),
    "param_rounding": ({"param_rounding": "stochastic"}, {"param_rounding": "nearest"}),
    "state_dtype": ({"state_dtype": "fp32"}, {"state_dtype": "bf16"}),
    "vote": ({"vote": "majority"}, {"vote": "average"}),
    "maximize": ({}, {"maximize": True}),
    "nonfinite_grad": ({"nonfinite_grad": "skip_step"}, {"nonfinite_grad": "skip_elements"}),
}


def check_agreement(rank):
    """Rank 1 builds DistributedLion with one option that shapes the update set otherwise: every rank
    raises the same RuntimeError and nothing moves. An lr that differs only below fp32's precision
    agrees (the kernels compute with fp32). Ranks built with different params all raise at
    construction (not one dying in the collective)."""
    outcome = {}
    for case, (base, other) in DISAGREEMENTS.items():
        kwargs = dict(other if rank == 1 else base)
        wd, group_lr = kwargs.pop("wd", 0.1), kwargs.pop("group_lr", None)
        maximize = kwargs.pop("maximize", False)
        params = make_params()
        param_groups = groups(params, wd)
        if group_lr is not None:
            param_groups[1]["lr"] = group_lr
        param_groups[0]["maximize"] = maximize
        opt = DistributedLion(param_groups, **{"lr": 0.01, **kwargs})
        for p, g in zip(params, grads_for(rank, 0, same=False)):
            p.grad = g
        before = snapshot(params)
        record_step(opt, params, before, outcome, case)
    params = make_params()
    opt = DistributedLion(groups(params), lr=0.01 * (1 + 1e-12 * rank))  # the same fp32 value
    for p, g in zip(params, grads_for(rank, 0, same=False)):
        p.grad = g
    opt.step()
    outcome["fp32_equal_lr"] = "stepped"
    params = make_params() + ([torch.nn.Parameter(torch.zeros(3))] if rank == 1 else [])
    try:
        DistributedLion(params, lr=0.01)
        outcome["params"] = "built"
    except RuntimeError as exc:
        outcome["params"] = str(exc)
    dist.barrier()  # the group survived every case
    return outcome


def main():
    out_dir = sys.argv[1]
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {
        "world": world,
        "same_data": check_same_data(rank),
        "fp32_majority": check_different_data(rank, torch.float32, "majority"),
        "fp32_average": check_different_data(rank, torch.float32, "average"),
        "bf16_majority": check_different_data(rank, torch.bfloat16, "majority", state_dtype="bf16"),
        "bf16_kahan_average": check_different_data(rank, torch.bfloat16, "average", param_rounding="kahan"),
        "ties": check_ties(rank, world),
        "bytes": check_bytes(rank),
        "skip": check_skip(rank),
        "resume": check_resume(rank),
        "layouts": check_gradient_layouts(rank),
        "sparse": check_sparse(rank),
        "agreement": check_agreement(rank),
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
