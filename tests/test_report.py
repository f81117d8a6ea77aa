"""lion_hf.experiments.report and .records: best-lr selection, mean/std over seeds, the three kinds of output
files, and the run-record schema they read."""

import json

import pytest

from lion_hf.experiments.records import REPORT_METRICS, RunRecord
from lion_hf.experiments.report import select_best, summarize, write_report


def make_run(optimizer, lr, seed, best, final_loss=0.5, reached_at=None):
    train = [{"step": s, "seconds": s * 0.1, "loss": 0.7 - 0.01 * s} for s in (5, 10, 15)]
    evals = [{"step": s, "seconds": s * 0.1, "eval_accuracy": best - 0.05 + 0.025 * i, "eval_loss": final_loss}
             for i, s in enumerate((5, 10, 15))]
    return {
        "optimizer": optimizer, "seed": seed, "learning_rate": lr, "weight_decay": 0.1, "model": "tiny",
        "peft": False, "data": "synthetic", "train_rows": 100, "eval_rows": 20, "steps": 15,
        "history": {"train": train, "eval": evals},
        "final_eval": {"eval_accuracy": best, "eval_loss": final_loss, "eval_macro_f1": best - 0.01},
        "final_train_loss": 0.55, "best_eval_accuracy": best, "steps_to_target": reached_at,
        "seconds_to_target": None if reached_at is None else reached_at * 0.1, "train_seconds": 10.0 + seed,
        "train_samples_per_second": 100.0, "peak_memory_bytes": 2**30, "optimizer_state_bytes": 2**20,
    }


RUNS = [
    make_run("adamw", 5e-5, 0, 0.80, reached_at=10), make_run("adamw", 5e-5, 1, 0.84, reached_at=15),
    make_run("lion", 1e-5, 0, 0.70), make_run("lion", 1e-5, 1, 0.72),
    make_run("lion", 2e-5, 0, 0.83, reached_at=15), make_run("lion", 2e-5, 1, 0.85, reached_at=5),
]


def test_select_best_keeps_each_optimizers_best_lr():
    best = select_best(RUNS)
    assert {r.learning_rate for r in best["lion"]} == {2e-5}
    assert len(best["lion"]) == 2 and len(best["adamw"]) == 2


def test_select_best_keeps_weight_decays_apart():
    # Same lr, two weight decays: the seeds of the better grid point only, never a mix.
    runs = [make_run("lion", 2e-5, s, acc) for s, acc in ((0, 0.80), (1, 0.82))]
    runs += [{**make_run("lion", 2e-5, s, acc), "weight_decay": 0.3} for s, acc in ((0, 0.86), (1, 0.88))]
    best = select_best(runs)["lion"]
    assert {r.weight_decay for r in best} == {0.3} and len(best) == 2


def test_summary_means_and_stds_over_seeds():
    summary = summarize(RUNS, target_accuracy=0.8)
    lion = summary["optimizers"]["lion"]
    assert lion["learning_rate"] == 2e-5 and lion["seeds"] == [0, 1]
    assert lion["metrics"]["best_eval_accuracy"]["mean"] == pytest.approx(0.84)
    assert lion["metrics"]["best_eval_accuracy"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert lion["metrics"]["steps_to_target"]["mean"] == pytest.approx(10)
    assert lion["metrics"]["train_seconds"]["mean"] == pytest.approx(10.5)
    assert len(summary["grid"]) == 3
    with pytest.raises(ValueError):
        summarize([])


def test_write_report_files(tmp_path):
    RUNS_WITH_MISS = RUNS + [make_run("adamw", 1e-4, 0, 0.60)]
    paths = write_report(RUNS_WITH_MISS, tmp_path, title="T", target_accuracy=0.8, notes=["note one"])
    md = paths["markdown"].read_text()
    assert "# T" in md and "note one" in md
    assert "lr 2e-05" in md and "0.8400 +/- 0.0141" in md
    # lion 0.84 +/- 0.014 vs adamw 0.82 +/- 0.028: a lead inside the spread names no winner.
    assert "- best eval accuracy (higher is better): lion 0.8400; adamw 0.8200 (-0.02, within the seed spread). " \
           "No clear winner: lion leads adamw by 0.02, within the seed spread (0.0283)." in md
    data = json.loads(paths["json"].read_text())
    assert len(data["runs"]) == 7 and data["summary"]["optimizers"]["adamw"]["learning_rate"] == 5e-5
    for name in ("train_loss", "eval_accuracy"):
        png = paths[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_says_when_lion_loses(tmp_path):
    runs = [make_run(opt, lr, seed, acc) for opt, lr, acc in (("adamw", 5e-5, 0.90), ("lion", 2e-5, 0.80))
            for seed, acc in ((0, acc), (1, acc + 0.01))]
    md = write_report(runs, tmp_path, target_accuracy=0.95)["markdown"].read_text()
    assert "Better: adamw, ahead of lion by 0.1, more than the seed spread (0.00707)." in md
    assert "not reached" in md


def test_one_seed_names_no_winner_and_says_it_has_no_spread(tmp_path):
    # One seed each, Lion twice as fast on the clock: a single pair of runs cannot tell that from machine noise.
    runs = [{**make_run("adamw", 5e-5, 0, 0.90), "train_seconds": 289.0},
            {**make_run("lion", 2e-5, 0, 0.80), "train_seconds": 150.0}]
    md = write_report(runs, tmp_path, target_accuracy=0.95)["markdown"].read_text()
    assert "One seed per setup: single values with no spread" in md
    assert "better:" not in md.lower() and "+/-" not in md
    assert "- train seconds (lower is better): lion 150.0; adamw 289.0 (+139, one seed: no spread to judge it). " \
           "No winner named: one seed gives no spread to tell a difference from noise." in md
    assert "1 seeds" not in md and "(lr 5e-05, wd 0.1, 1 seed)" in md and "in 0 of 1 seed." in md


def test_every_setup_gets_its_line(tmp_path):
    runs = [{**make_run(opt, 1e-4, seed, acc + 0.001 * seed), "setup": setup}
            for setup, opt, acc in (("lion", "lion", 0.85), ("adamw", "adamw", 0.84), ("lion_bf16", "lion", 0.70))
            for seed in (0, 1)]
    md = write_report(runs, tmp_path, target_accuracy=0.8)["markdown"].read_text()
    accuracy = next(line for line in md.splitlines() if line.startswith("- best eval accuracy"))
    assert "lion 0.8505; adamw 0.8405 (-0.01, beyond the seed spread); lion_bf16 0.7005 (-0.15, beyond" in accuracy
    for setup in ("lion", "adamw", "lion_bf16"):
        assert f"- {setup} reached accuracy 0.8 in" in md
    assert "- lion_bf16 reached accuracy 0.8 in 0 of 2 seeds." in md


def test_run_record_round_trips_and_names_bad_fields(tmp_path):
    record = RunRecord.from_dict(make_run("lion", 2e-5, 0, 0.83))
    path = record.write(tmp_path / "r" / "run.json")
    again = RunRecord.read(path)
    assert again == record and again.name == "lion" and again.resumed_from == []
    with pytest.raises(ValueError, match=r"unknown fields \['best_acc'\]"):
        RunRecord.from_dict({**record.to_dict(), "best_acc": 0.9})
    data = record.to_dict()
    del data["final_eval"]
    with pytest.raises(ValueError, match=r"missing fields \['final_eval'\]"):
        RunRecord.from_dict(data)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        RunRecord.read(tmp_path / "bad.json")


def test_every_report_metric_reaches_the_table(tmp_path):
    md = write_report(RUNS, tmp_path)["markdown"].read_text()
    for metric in REPORT_METRICS:
        assert f"| {metric.label}" in md, metric.key


def test_sweep_report_retunes_lr_per_value(tmp_path):
    from lion_hf.experiments.report import summarize_sweep, write_sweep_report

    runs = []
    for batch, (lion_best, adamw_best) in {32: ((2e-5, 0.84), (5e-5, 0.86)), 256: ((1e-4, 0.85), (4e-4, 0.83))}.items():
        for lr in (2e-5, 1e-4):
            acc = lion_best[1] if lr == lion_best[0] else 0.7
            runs += [RunRecord.from_dict({**make_run("lion", lr, s, acc + 0.01 * s), "global_batch_size": batch})
                     for s in (0, 1)]
        for lr in (5e-5, 4e-4):
            acc = adamw_best[1] if lr == adamw_best[0] else 0.6
            runs += [RunRecord.from_dict({**make_run("adamw", lr, s, acc), "global_batch_size": batch})
                     for s in (0, 1)]
    summary = summarize_sweep(runs, "global_batch_size")
    assert summary["values"] == [32, 256]
    assert summary["per_value"]["32"]["optimizers"]["lion"]["learning_rate"] == 2e-5
    assert summary["per_value"]["256"]["optimizers"]["lion"]["learning_rate"] == 1e-4
    assert summary["per_value"]["256"]["optimizers"]["adamw"]["learning_rate"] == 4e-4
    paths = write_sweep_report(runs, tmp_path, "global_batch_size", title="sweep")
    md = paths["markdown"].read_text()
    assert "| 32 | 0.8450 +/- 0.0071 (lr 2e-05) | 0.8600 +/- 0.0000 (lr 5e-05) |" in md
    assert "- global_batch_size 256: best lion (0.8550); then adamw -0.0250." in md
    assert paths["sweep_accuracy"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="does not record 'max_length'"):
        summarize_sweep(runs, "max_length")
