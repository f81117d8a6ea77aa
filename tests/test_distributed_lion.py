"""DistributedLion: the sign vote, its wire format, and LionTrainer's ``lion_distributed``.

The multi-process checks run in few launches (process start-up dominates): all the optimizer's
checks in one ``torch.distributed.run`` of tests/launchers/distributed_lion_checks.py (2 gloo CPU
processes; 4 under ``slow``), the Trainer's in one ``accelerate launch`` of
tests/launchers/distributed_lion_train.py. The tests below assert what those runs recorded,
against references computed here from each rank's recorded ``c``.
"""

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lion_hf import DistributedLion, Lion
from lion_hf.optim.distributed import HEADER_BYTES, combine_signs, pack_signs, packed_nbytes, unpack_signs

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHECKS = TESTS / "launchers" / "distributed_lion_checks.py"
TRAIN = TESTS / "launchers" / "distributed_lion_train.py"
LR = 0.01
DECAYS = [1.0 - LR * 0.1] * 3 + [1.0] * 2  # the launcher's groups: three tensors decayed, two not

sys.path.insert(0, str(TESTS))
from tiny_models import TokenDataset, tiny_bert  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    path = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _run(cmd, cwd) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _signs(t: torch.Tensor) -> torch.Tensor:
    return (t > 0).to(torch.int16) - (t < 0).to(torch.int16)


def _vote(cs: list[torch.Tensor], vote: str) -> torch.Tensor:
    total = sum(_signs(c) for c in cs)
    return torch.sign(total).float() if vote == "majority" else total.float() / len(cs)


# --------------------------------------------------------------------------------------
# One process, no launch
# --------------------------------------------------------------------------------------


@st.composite
def _sign_tensors(draw):
    sizes = draw(st.lists(st.integers(0, 23), min_size=0, max_size=5))
    return [torch.tensor(draw(st.lists(st.sampled_from([-2.5, -1.0, -0.0, 0.0, 1e-30, 3.0, float("nan"),
                                                        float("inf"), float("-inf")]), min_size=n, max_size=n)),
                         dtype=torch.float32) for n in sizes]


@settings(max_examples=150, deadline=None)
@given(_sign_tensors(), st.integers(0, 7))
def test_pack_unpack_round_trip(tensors, header):
    numel = sum(t.numel() for t in tensors)
    packed = pack_signs(tensors, header_bytes=header)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, header) == header + -(-numel // 5)
    assert not packed[:header].any() and (int(packed.max()) if packed.numel() else 0) <= 242
    want = torch.cat([_signs(t) for t in tensors]).to(torch.int8) if tensors else torch.zeros(0, dtype=torch.int8)
    assert torch.equal(unpack_signs(packed[header:], numel), want)
    # Two "ranks" with these signs and their negation, and with themselves: ties and agreement.
    neg = pack_signs([-t for t in tensors])
    both = torch.stack([packed[header:], neg])
    assert torch.equal(combine_signs(both, numel, "majority"), torch.zeros(numel))
    same = torch.stack([packed[header:], packed[header:]])
    assert torch.equal(combine_signs(same, numel, "majority"), want.float())
    assert torch.equal(combine_signs(same, numel, "average"), want.float())


def test_combine_votes_and_padding():
    a = pack_signs([torch.tensor([1.0, 1.0, 0.0, -1.0, 1.0, 1.0, -1.0])])
    b = pack_signs([torch.tensor([1.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0])])
    c = pack_signs([torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0])])
    assert a.numel() == 2  # 7 elements: two bytes, the last padded with zero signs
    gathered = torch.stack([a, b, c])
    assert combine_signs(gathered, 7, "majority").tolist() == [1, 0, 0, -1, 1, 0, -1]
    third = 1 / 3
    assert torch.equal(combine_signs(gathered, 7, "average"),
                       torch.tensor([3, 0, 0, -1, 1, 0, -1], dtype=torch.float32) / 3)
    assert abs(float(combine_signs(gathered, 7, "average")[3]) + third) < 1e-7
    with pytest.raises(ValueError, match="vote"):
        combine_signs(gathered, 7, "median")


def test_arguments_are_validated():
    p = torch.nn.Parameter(torch.zeros(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="vote"):
            DistributedLion([p], vote="mean")
        with pytest.raises(ValueError, match="cautious"):
            DistributedLion([{"params": [p], "cautious": True}])
        with pytest.raises(ValueError, match="lr"):
            DistributedLion([p], lr=-1.0)  # Lion's own validation
        with pytest.raises(ValueError, match="nonfinite_grad"):
            DistributedLion([p], nonfinite_grad="ignore")


def _lion_pair(dtype, vote="majority", **kwargs):
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 3), (7,), (0,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dl = DistributedLion([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:]}], lr=0.01, vote=vote,
                             **kwargs)
    lion = Lion([{"params": qs[:1], "weight_decay": 0.1}, {"params": qs[1:]}], lr=0.01, **kwargs)
    return ps, qs, dl, lion, caught


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_process_without_a_process_group_is_lion_bit_for_bit(dtype):
    ps, qs, dl, lion, caught = _lion_pair(dtype, impl="foreach", nonfinite_grad="skip_step")
    assert any("not initialised" in str(w.message) for w in caught)
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]
        if step == 2:
            grads[1][0] = float("nan")
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        torch.manual_seed(step)  # the same stochastic-rounding seeds
        dl.step()
        torch.manual_seed(step)
        lion.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(dl.state[p]["exp_avg"], lion.state[q]["exp_avg"])
    assert dl.skipped_steps == lion.skipped_steps == 1
    assert dl.state_dict()["state"].keys() == lion.state_dict()["state"].keys()


def test_lion_state_loads_both_ways_and_deepcopy_keeps_the_options():
    import copy

    ps, qs, dl, lion, _ = _lion_pair(torch.float32, vote="average")
    for p, q in zip(ps, qs):
        p.grad = q.grad = torch.ones(p.shape)
    lion.step()
    dl.load_state_dict(lion.state_dict())
    assert all(torch.equal(dl.state[p]["exp_avg"], lion.state[q]["exp_avg"]) for p, q in zip(ps, qs) if p.numel())
    lion.load_state_dict(dl.state_dict())
    clone = copy.deepcopy(dl)
    assert (clone.vote, clone.nonfinite_grad, clone.process_group) == ("average", "skip_step", None)


def test_a_world_of_one_is_lion_without_a_warning_and_without_a_collective(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        calls = []
        monkeypatch.setattr(dist, "all_gather_single", lambda *a, **k: calls.append(a))
        ps, qs, dl, lion, caught = _lion_pair(torch.float32, impl="foreach", nonfinite_grad="skip_elements")
        assert not [w for w in caught if "DistributedLion" in str(w.message)]
        for _ in range(3):
            for p, q in zip(ps, qs):
                p.grad = q.grad = torch.randn(p.shape)
            dl.step()
            lion.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs)) and not calls
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------
# Several processes: tests/launchers/distributed_lion_checks.py
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=["2proc", "4proc"])
def ranks(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"dlion{world}")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
          str(_free_port()), str(CHECKS), str(out)], out)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
    assert [r["world"] for r in results] == [world] * world
    return results


def test_identical_data_on_every_rank_equals_lion(ranks):
    for rank in ranks:
        for vote in ("majority", "average"):
            run = rank["same_data"][vote]
            for a, b, m, n in zip(run["params"], run["lion"], run["m"], run["lion_m"]):
                assert torch.equal(a, b), vote
                assert torch.equal(m, n), vote


def test_a_sparse_gradient_is_refused_on_every_rank(ranks):
    for rank in ranks:
        assert "DistributedLion takes dense gradients" in rank["sparse"]["outcome"]
        assert rank["sparse"]["unchanged"]


@pytest.mark.parametrize("case", ["fp32_majority", "fp32_average"])
def test_different_data_is_combined_as_the_vote_says(ranks, case):
    vote = case.split("_")[1]
    for step in range(3):
        records = [rank[case][step] for rank in ranks]
        for i, decay in enumerate(DECAYS):
            update = _vote([r["c"][i] for r in records], vote)
            want = records[0]["before"][i] * decay - update * LR
            for r in records:
                assert torch.equal(r["before"][i], records[0]["before"][i])  # replicas identical
                assert torch.equal(r["after"][i], want), (case, step, i)
                m_want = r["m_before"][i] * 0.99 + r["grads"][i] * (1.0 - 0.99)
                assert torch.equal(r["m_after"][i], m_want)  # each rank's momentum from its own gradient
        # The momenta are local: they differ between ranks (different data).
        assert not torch.equal(records[0]["m_after"][0], records[1]["m_after"][0])
        # The vote really combines: it differs from rank 0's own sign somewhere.
        assert not torch.equal(_vote([records[0]["c"][0]], vote), _vote([r["c"][0] for r in records], vote))


def test_bf16_replicas_stay_bit_identical_under_stochastic_rounding(ranks):
    for step in range(3):
        records = [rank["bf16_majority"][step] for rank in ranks]
        for i, decay in enumerate(DECAYS):
            after = [r["after"][i] for r in records]
            assert after[0].dtype == torch.bfloat16
            assert all(torch.equal(a, after[0]) for a in after), (step, i)
            update = _vote([r["c"][i] for r in records], "majority")
            exact = records[0]["before"][i].float() * decay - update * LR
            # Stochastic rounding: one of the two bf16 neighbours of the exact value.
            assert bool(((after[0].float() - exact).abs() <= exact.abs() * 2.0**-7 + 1e-30).all())
    # The rounding was stochastic (not to nearest) somewhere, and identical on every rank although the
    # ranks' global generators differ (the launcher seeds them by rank): the seeds came from rank 0.
    away = 0
    for step in range(3):
        records = [rank["bf16_majority"][step] for rank in ranks]
        for i, decay in enumerate(DECAYS):
            exact = records[0]["before"][i].float() * decay - _vote([r["c"][i] for r in records], "majority") * LR
            away += int((records[0]["after"][i] != exact.to(torch.bfloat16)).sum())
    assert away > 0


def test_bf16_kahan_replicas_and_residuals_agree(ranks):
    for step in range(3):
        records = [rank["bf16_kahan_average"][step] for rank in ranks]
        for i in range(len(DECAYS)):
            assert all(torch.equal(r["after"][i], records[0]["after"][i]) for r in records), (step, i)
            assert all(torch.equal(r["comps"][i], records[0]["comps"][i]) for r in records), (step, i)
        if step == 0:  # from zero residuals: weight + residual is the exact fp32 step to within bf16 of it
            for i, decay in enumerate(DECAYS):
                exact = records[0]["before"][i].float() * decay - _vote([r["c"][i] for r in records], "average") * LR
                held = records[0]["after"][i].float() + records[0]["comps"][i].float()
                assert torch.allclose(held, exact, rtol=2.0**-14, atol=1e-6)


def test_sign_zero_and_ties(ranks):
    world = len(ranks)
    sys.path.insert(0, str(CHECKS.parent))
    from distributed_lion_checks import sign_pattern

    signs = torch.stack([sign_pattern(r, world) for r in range(world)])
    total = signs.sum(0)
    for rank in ranks:
        majority, average = rank["ties"]["majority"], rank["ties"]["average"]
        assert torch.equal(majority, -torch.sign(total))  # p = 0 - lr * u with lr = 1
        assert torch.equal(average, -total / world)
        assert majority[0] == 0 and average[0] == 0  # sign(0) on every rank: never moves
        assert majority[1] == 0 and average[1] == 0  # +1 and -1 in equal numbers: a tie, no move
        assert average[2] == -1 / world  # one +1, the rest 0
        assert majority[2] == -1.0
    if world == 2:
        assert ranks[0]["ties"]["average"][2] == -0.5


def test_one_collective_per_step_and_at_most_a_sixteenth_of_the_fp32_bytes(ranks):
    for rank in ranks:
        record = rank["bytes"]
        numel = record["numel"]
        assert len(record["per_step"]) == 3
        for calls in record["per_step"]:
            assert len(calls) == 1, calls
            name, sent = calls[0]
            assert name in ("all_gather_single", "all_gather_into_tensor")
            assert sent == HEADER_BYTES + -(-numel // 5) == packed_nbytes(numel)
            assert sent * 16 <= 4 * numel, (sent, numel)
        assert record["skipped"] == 1  # the NaN step on rank 1: skipped everywhere, in the same one collective


def test_a_nonfinite_gradient_on_one_rank_makes_every_rank_skip(ranks):
    for rank in ranks:
        for how in ("grad", "norm"):
            run = rank["skip"][how]
            assert run["skipped"] == 1, how
            for a, b in zip(run["before"], run["after"]):
                assert torch.equal(a, b), how
            for a, b in zip(run["m_before"], run["m_after"]):
                assert torch.equal(a, b), how
        assert rank["skip"]["raise"] == {"raised": True, "unchanged": True}


def test_skip_elements_abstains_on_the_bad_rank_only(ranks):
    records = [rank["skip"]["skip_elements"] for rank in ranks]
    assert all(r["skipped"] == 0 for r in records)
    for i, decay in enumerate(DECAYS):
        cs = [r["c"][i].clone() for r in records]
        if i == 1:
            cs[1][3] = 0.0  # rank 1's NaN element abstains
        want = records[0]["before"][i] * decay - _vote(cs, "majority") * LR
        for r in records:
            assert torch.equal(r["after"][i], want), i
    bad = records[1]
    assert bad["m_after"][1][3] == bad["m_before"][1][3]  # its momentum element kept
    assert torch.isfinite(bad["m_after"][1]).all()


def test_state_dict_round_trip_per_rank(ranks):
    for rank in ranks:
        run = rank["resume"]
        assert all(torch.equal(a, b) for a, b in zip(run["straight"], run["resumed"]))
        assert all(torch.equal(a, b) for a, b in zip(run["m"], run["m_resumed"]))
    assert not torch.equal(ranks[0]["resume"]["m"][0], ranks[1]["resume"]["m"][0])


def test_ranks_whose_gradients_cover_different_params_all_raise_and_change_nothing(ranks):
    """Same sizes swapped between ranks (a count-only check would pass and each rank would apply
    the vote to another param), and a grad missing on one rank (the buffers would differ in size
    and gloo would abort the process)."""
    for case in ("swapped", "missing"):
        messages = {rank["layouts"][case] for rank in ranks}
        assert len(messages) == 1 and "different sets of params" in messages.pop(), case
        assert all(rank["layouts"][case + "_unchanged"] for rank in ranks), case


@pytest.mark.parametrize("case", ["lr", "weight_decay", "group_lr", "param_rounding", "state_dtype", "vote",
                                  "maximize", "nonfinite_grad"])
def test_ranks_that_disagree_on_what_shapes_the_update_all_raise_the_same_error(ranks, case):
    messages = {rank["agreement"][case] for rank in ranks}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "disagree on what shapes the update" in message and "rank(s) [1]" in message, message
    assert all(rank["agreement"][case + "_unchanged"] for rank in ranks)


def test_an_lr_equal_in_fp32_agrees_and_ranks_built_with_other_params_all_raise(ranks):
    assert all(rank["agreement"]["fp32_equal_lr"] == "stepped" for rank in ranks)
    messages = {rank["agreement"]["params"] for rank in ranks}
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "built with different params" in message and "rank 1: 6 params" in message, message


def test_a_failed_collective_names_a_rank_that_skipped_step(monkeypatch):
    from lion_hf.optim import distributed

    def closed(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(torch.distributed, "all_gather_single", closed, raising=False)
    monkeypatch.setattr(torch.distributed, "all_gather_into_tensor", closed)
    with pytest.raises(RuntimeError, match=r"Connection closed by peer.*skipped a step\(\) call"):
        distributed._all_gather(torch.empty(4, dtype=torch.uint8), torch.empty(2, dtype=torch.uint8), None)


# --------------------------------------------------------------------------------------
# LionTrainer(lion_distributed=...): one process, no launch
# --------------------------------------------------------------------------------------


def _args(tmp_path, **kwargs):
    from lion_hf import LionTrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LionTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                                     disable_tqdm=True, **kwargs)


def test_lion_distributed_is_validated(tmp_path):
    from lion_hf import LionTrainer

    with pytest.raises(ValueError, match="lion_distributed must be one of"):
        _args(tmp_path, lion_distributed="vote")
    assert _args(tmp_path).lion_distributed == "none"
    with pytest.raises(ValueError, match="needs optim='lion'"):
        LionTrainer(model=tiny_bert(), args=_args(tmp_path, optim="adamw", lion_distributed="majority"))
    with pytest.raises(ValueError, match="lion_cautious"):
        LionTrainer(model=tiny_bert(), args=_args(tmp_path, lion_cautious=True, lion_distributed="average"))


def test_fsdp_and_deepspeed_are_refused(tmp_path):
    from lion_hf import LionTrainer
    from lion_hf.trainer import check_distributed_lion

    args = _args(tmp_path, lion_distributed="majority")
    with pytest.raises(ValueError, match="DeepSpeed: its engine"):
        check_distributed_lion(args, deepspeed=True, fsdp=False)
    with pytest.raises(ValueError, match="FSDP: each rank holds only a shard"):
        check_distributed_lion(args, deepspeed=False, fsdp=True)
    assert check_distributed_lion(_args(tmp_path), deepspeed=True, fsdp=True) is None  # "none": no objection

    class OnFSDP(LionTrainer):  # what HF's accelerator set-up reports under an FSDP plugin
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            self.is_fsdp_enabled = True

    with pytest.raises(ValueError, match="cannot run under FSDP"):
        OnFSDP(model=tiny_bert(), args=args)


def test_one_process_trains_plain_lion_with_a_warning(tmp_path):
    from lion_hf import LionTrainer

    args = _args(tmp_path, lion_distributed="majority", max_steps=2, per_device_train_batch_size=8)
    with pytest.warns(UserWarning, match="on one process: training with plain Lion"):
        trainer = LionTrainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())
    trainer.train()
    from lion_hf.trainer import unwrap_optimizer

    assert type(unwrap_optimizer(trainer.optimizer)) is Lion
    assert trainer.state.global_step == 2


# --------------------------------------------------------------------------------------
# LionTrainer(lion_distributed="majority") under accelerate launch: tests/launchers/distributed_lion_train.py
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dlion_train")
    (tmp / "out").mkdir()
    env_cpu = {"ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(TRAIN), str(tmp / "out"), str(tmp / "w")]
    result = subprocess.run(cmd, cwd=tmp, env={**_env(), **env_cpu}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [torch.load(tmp / "out" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, tmp / "w"


def test_trainer_refuses_to_turn_off_the_allreduce_under_an_optimizer_of_the_users_own(trained):
    ranks, _ = trained
    for rank in ranks:
        message = rank["own_optimizer"]
        assert "turns off DDP's gradient all-reduce" in message and "steps Lion" in message, message


def test_trainer_votes_with_distributed_lion_and_no_gradient_allreduce(trained):
    ranks, _ = trained
    for run in ("straight", "resumed"):
        a, b = (rank[run] for rank in ranks)
        assert a["optimizer"] == b["optimizer"] == "DistributedLion"
        assert a["global_step"] == 4 and a["average_tokens_across_devices"] is False
        # DDP's all-reduce is off: the gradients each rank's optimizer steps with differ.
        assert all(not torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))
        # Replicas identical, momenta local.
        assert a["params"].keys() == b["params"].keys()
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
        assert all(not torch.equal(a["momenta"][n], b["momenta"][n]) for n in a["momenta"])
        numel = sum(p.numel() for p in a["params"].values())
        for rank in ranks:
            gathers = rank[run]["gathers"]
            assert len(gathers) == (4 if run == "straight" else 2)  # steps 3-4 after the resume
            # One gather per optimizer step (gradient accumulation over 2 micro-batches votes once).
            assert all(g == [("all_gather_single", packed_nbytes(numel))] for g in gathers), gathers
            # The other Python-level collectives are HF's logging gathers of the loss: no gradient.
            assert set(rank[run]["collectives"]) <= {"all_gather_single", "all_gather"}


def test_trainer_gradients_are_each_ranks_own_mean_loss_gradient(trained):
    ranks, _ = trained
    for rank in ranks:
        straight = rank["straight"]
        assert straight["model_accepts_loss_kwargs"] is False
        # Not divided by the world size (DDP's default hook), not multiplied by it (HF's loss scale).
        assert torch.allclose(straight["grads"][0], straight["reference_grad"], rtol=1e-6, atol=1e-9)


def test_trainer_grad_norm_is_per_rank(trained):
    ranks, _ = trained
    norms = [[e["grad_norm"] for e in rank["straight"]["log"]] for rank in ranks]
    assert len(norms[0]) == 4 and norms[0] != norms[1]


def test_trainer_resume_is_bit_identical(trained):
    ranks, workdir = trained
    checkpoint = workdir / "straight" / "checkpoint-2"
    assert {"optimizer.pt", "optimizer_rank0.pt", "optimizer_rank1.pt"} <= {p.name for p in checkpoint.iterdir()}
    for rank in ranks:
        straight, resumed = rank["straight"], rank["resumed"]
        assert all(torch.equal(straight["params"][n], resumed["params"][n]) for n in straight["params"])
        assert all(torch.equal(straight["momenta"][n], resumed["momenta"][n]) for n in straight["momenta"])
    saved = torch.load(checkpoint / "optimizer_rank1.pt", weights_only=True)
    assert (saved["rank"], saved["world_size"]) == (1, 2)


def _fake_world(monkeypatch, world_size: int, others: list[torch.Tensor]):
    """One process that steps as rank 0 of ``world_size``: the gather returns this rank's buffer
    and the given packed signs of the other ranks (under this rank's header, flag cleared)."""
    from lion_hf.optim import distributed

    def gather(output, buffer, group):
        rows = output.view(world_size, -1)
        rows[0] = buffer
        for rank, signs in enumerate(others, start=1):
            rows[rank, :HEADER_BYTES] = buffer[:HEADER_BYTES]
            rows[rank, 0] = 0
            rows[rank, HEADER_BYTES:] = signs

    monkeypatch.setattr(DistributedLion, "world_size", lambda self: world_size)
    monkeypatch.setattr(distributed, "_all_gather", gather)


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("policy", ["skip_step", "skip_elements", "propagate"])
def test_the_cpp_kernel_and_the_torch_path_agree_bit_for_bit(monkeypatch, world_size, vote, policy):
    """The fp32 CPU step runs in the C++ kernel's two passes, every other step in torch ops: a
    rank whose kernel failed to build must still move its replica exactly as the others do.
    Sizes cross the packing's chunk boundaries (5 x 4096 elements); two groups, maximize in one;
    NaN/inf grads where the policy lets the step run."""
    from lion_hf.optim import cpu_kernel

    if cpu_kernel.sign_vote_kernels() is None:
        pytest.skip("no C++ compiler: the kernel path cannot run")
    generator = torch.Generator().manual_seed(world_size * 7 + len(vote) + len(policy))
    shapes = [(20479,), (3, 7), (), (0,), (20481,), (41, 1000)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    grads[1][0, 0] = 0.0
    if policy != "skip_step":
        grads[4][5], grads[5][3, 9] = float("nan"), float("inf")
    momenta = [torch.randn(s, generator=generator) * (torch.rand(s, generator=generator) > 0.1) for s in shapes]
    numel = sum(p.numel() for p in params)
    others = [pack_signs([torch.randint(-1, 2, (numel,), generator=generator).float()])
              for _ in range(world_size - 1)]
    _fake_world(monkeypatch, world_size, others)
    kernel_calls = []
    real_kernels = cpu_kernel.sign_vote_kernels()

    def counting():
        kernel_calls.append(1)
        return real_kernels

    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(cpu_kernel, "sign_vote_kernels", counting if use_kernel else lambda: None)
        ps = [p.clone().requires_grad_() for p in params]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = DistributedLion([{"params": ps[:3], "weight_decay": 0.1},
                                   {"params": ps[3:], "maximize": True, "lr": 0.03}],
                                  lr=0.01, vote=vote, nonfinite_grad=policy)
        for p, m in zip(ps, momenta):
            opt.state[p]["exp_avg"] = m.clone()
        opt.step()
        results.append(([p.detach().clone() for p in ps], [opt.state[p]["exp_avg"].clone() for p in ps]))
    assert kernel_calls, "the kernel path never ran"
    (kernel_ps, kernel_ms), (torch_ps, torch_ms) = results
    for a, b in zip(kernel_ps + kernel_ms, torch_ps + torch_ms):
        assert a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.int32), b.view(-1).view(torch.int32)) or (
            torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)]))
    moved = sum(int((a != p).sum()) for a, p in zip(kernel_ps, params))
    assert moved > numel // 4, "the step hardly moved the weights: the comparison would be vacuous"


_FAKE_TWO_RANKS = """
import os, sys, warnings
import torch
from lion_hf import DistributedLion
from lion_hf.optim import distributed

def gather(output, buffer, group):  # two ranks with the same signs
    output.view(2, -1).copy_(buffer.expand(2, -1))

DistributedLion.world_size = lambda self: 2
distributed._all_gather = gather
warnings.simplefilter("ignore")
params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7, 5))]
before = [p.detach().clone() for p in params]
opt = DistributedLion(params, lr=0.01, impl=sys.argv[1])
for p in params:
    p.grad = torch.randn(p.shape)
opt.step()
assert all(not torch.equal(a, p) for a, p in zip(before, params)), "the step did not move the weights"
maps = open("/proc/self/maps").read()
print("module", "lion_hf.optim.cpu_kernel" in sys.modules)
print("mapped", "lion_cpu_kernel_" in maps)
print("built", any(name.endswith(".so") for name in os.listdir(os.environ["LION_HF_CACHE"])))
"""


@pytest.mark.parametrize("impl", ["foreach", pytest.param("auto", marks=pytest.mark.slow)])  # auto: a fresh build
def test_foreach_never_builds_or_loads_the_cpp_kernel(tmp_path, impl):
    """DistributedLion(impl="foreach") steps (both passes) without importing the kernel's module,
    building its library into an empty cache or mapping it; "auto" on the CPU does all three (where
    a compiler is found), so the check can tell them apart."""
    from lion_hf.optim.dispatch import impl_unavailable

    cache = tmp_path / "cache"
    cache.mkdir()
    result = subprocess.run([sys.executable, "-c", _FAKE_TWO_RANKS, impl], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**_env(), "LION_HF_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    facts = dict(line.split() for line in result.stdout.splitlines())
    if impl == "foreach":
        assert facts == {"module": "False", "mapped": "False", "built": "False"}, facts
    elif impl_unavailable("cpp", "cpu") is None:
        assert facts == {"module": "True", "mapped": "True", "built": "True"}, facts

