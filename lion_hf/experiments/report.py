"""Turn fine-tuning runs into a side-by-side optimizer report: Markdown, JSON and PNG plots.

A *run* is a :class:`~lion_hf.experiments.records.RunRecord` (or its dict, as
``recipes/finetune_sentiment.py`` writes it to ``run.json``): optimizer, seed, learning rate,
weight decay, the logged history and summary numbers. The table's rows are
:data:`~lion_hf.experiments.records.REPORT_METRICS`.

For each optimizer the report keeps the learning rate with the best mean best-eval-accuracy
over seeds (the rest of the grid is listed too), then gives mean +/- std over seeds. The
selection uses the same eval set it reports on, for every optimizer alike: say so when quoting.

The verdict claims only what the runs show: every setup gets its place on each headline metric, with its gap to
the best; a setup is named better only when that gap exceeds the seed-to-seed spread (the larger of the two
standard deviations), so a one-seed comparison, which has no spread, names no winner at all.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lion_hf.experiments.records import REPORT_METRICS, RunRecord

__all__ = [
    "plural",
    "select_best",
    "setup_of",
    "summarize",
    "summarize_sweep",
    "sweep_value",
    "write_report",
    "write_sweep_report",
]

Run = RunRecord | Mapping[str, Any]


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 seed``, ``2 seeds``, ``0 runs``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def _records(runs: Iterable[Run]) -> list[RunRecord]:
    return [RunRecord.from_dict(r, where=f"run {i}") for i, r in enumerate(runs)]


def setup_of(run: Run) -> str:
    """What a run is compared as: its named setup (e.g. ``lion_bf16``), else its optimizer."""
    return RunRecord.from_dict(run).name


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def select_best(runs: Iterable[Run]) -> dict[str, list[RunRecord]]:
    """setup -> the runs (all seeds) of its (learning rate, weight decay) grid point with the
    best mean best-eval-accuracy."""
    grid: dict[str, dict[tuple[float, float], list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for run in _records(runs):
        grid[run.name][(run.learning_rate, run.weight_decay)].append(run)
    best = {}
    for optimizer, by_point in grid.items():
        point = max(by_point, key=lambda k: statistics.fmean(r.best_eval_accuracy for r in by_point[k]))
        best[optimizer] = by_point[point]
    return best


def summarize(runs: Iterable[Run], target_accuracy: float | None = None) -> dict[str, Any]:
    """Per setup (at its best lr): mean/std of every :data:`REPORT_METRICS` number, plus the whole lr grid."""
    runs = _records(runs)
    if not runs:
        raise ValueError("no runs to summarize")
    summary: dict[str, Any] = {"target_accuracy": target_accuracy, "optimizers": {}, "grid": []}
    for optimizer, chosen in select_best(runs).items():
        stats = {}
        for metric in REPORT_METRICS:
            values = [v for v in (metric.value(r) for r in chosen) if v is not None]
            mean, std = _mean_std(values)
            stats[metric.key] = {"mean": mean, "std": std, "n": len(values)}
        summary["optimizers"][optimizer] = {
            "learning_rate": chosen[0].learning_rate,
            "weight_decay": chosen[0].weight_decay,
            "seeds": sorted(r.seed for r in chosen),
            "metrics": stats,
        }
    grid: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        grid[(run.name, run.learning_rate, run.weight_decay)].append(run.best_eval_accuracy)
    for (optimizer, lr, wd), accs in sorted(grid.items()):
        mean, std = _mean_std(accs)
        summary["grid"].append({"optimizer": optimizer, "learning_rate": lr, "weight_decay": wd,
                                "best_eval_accuracy_mean": mean, "best_eval_accuracy_std": std, "seeds": len(accs)})
    return summary


# (metric key, label, which way is better, value format) of the headline comparisons.
VERDICT_METRICS = (
    ("best_eval_accuracy", "best eval accuracy", "higher", "{:.4f}"),
    ("final_eval_loss", "final eval loss", "lower", "{:.4f}"),
    ("train_seconds", "train seconds", "lower", "{:.1f}"),
)


def _verdict(summary: dict[str, Any]) -> list[str]:
    """One line per headline metric ranking every setup, naming a better one only beyond the seed spread."""
    opts = summary["optimizers"]
    if len(opts) < 2:
        return []
    lines = []
    for key, label, better, fmt in VERDICT_METRICS:
        entries = [(name, o["metrics"][key]) for name, o in opts.items() if o["metrics"][key]["n"] > 0
                   and not math.isnan(o["metrics"][key]["mean"])]
        if len(entries) < 2:
            continue
        entries.sort(key=lambda e: -e[1]["mean"] if better == "higher" else e[1]["mean"])
        (best_name, best), (runner_name, runner) = entries[0], entries[1]
        parts = [f"{best_name} {fmt.format(best['mean'])}"]
        for name, m in entries[1:]:
            gap = m["mean"] - best["mean"]
            spread = max(best["std"], m["std"]) if min(best["n"], m["n"]) > 1 else None
            judged = ("tied" if gap == 0 else "one seed: no spread to judge it" if spread is None
                      else "within the seed spread" if abs(gap) <= spread else "beyond the seed spread")
            parts.append(f"{name} {fmt.format(m['mean'])} ({gap:+.4g}, {judged})")
        lead = abs(runner["mean"] - best["mean"])
        spread = max(best["std"], runner["std"]) if min(best["n"], runner["n"]) > 1 else None
        if lead == 0:
            verdict = f"{best_name} and {runner_name} tie"
        elif spread is None:
            verdict = "no winner named: one seed gives no spread to tell a difference from noise"
        elif lead > spread:
            verdict = (f"better: {best_name}, ahead of {runner_name} by {lead:.4g}, more than the seed spread "
                       f"({spread:.3g})")
        else:
            verdict = (f"no clear winner: {best_name} leads {runner_name} by {lead:.4g}, within the seed spread "
                       f"({spread:.3g})")
        lines.append(f"- {label} ({better} is better): {'; '.join(parts)}. {verdict[0].upper()}{verdict[1:]}.")
    t = summary.get("target_accuracy")
    if t is not None:
        for name, o in opts.items():
            n = o["metrics"]["steps_to_target"]["n"]
            lines.append(f"- {name} reached accuracy {t:g} in {n} of {plural(len(o['seeds']), 'seed')}.")
    return lines


def _markdown(summary: dict[str, Any], title: str, notes: list[str]) -> str:
    opts = summary["optimizers"]
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if all(len(o["seeds"]) == 1 for o in opts.values()):
        lines += ["", "One seed per setup: single values with no spread, so no difference below is tested against "
                      "seed-to-seed noise; each setup at its best learning rate of the grid.", ""]
    else:
        lines += ["", "Mean +/- std over seeds, each setup at its best learning rate of the grid.", ""]
    header = "| metric | " + " | ".join(
        f"{name} (lr {o['learning_rate']:g}, wd {o['weight_decay']:g}, {plural(len(o['seeds']), 'seed')})"
        for name, o in opts.items()
    ) + " |"
    lines += [header, "|---|" + "---:|" * len(opts)]
    for metric in REPORT_METRICS:
        key, label, fmt = metric.key, metric.label, metric.fmt
        if key.endswith("to_target") and summary.get("target_accuracy") is not None:
            label = f"{label} ({summary['target_accuracy']:g})"
        cells = []
        for o in opts.values():
            m = o["metrics"][key]
            if m["n"] == 0:
                cells.append("not reached" if key.endswith("to_target") else "n/a")
                continue
            cell = fmt.format(m["mean"])
            if len(o["seeds"]) > 1:
                cell += " +/- " + fmt.format(m["std"])
            if m["n"] < len(o["seeds"]):
                cell += f" ({m['n']}/{plural(len(o['seeds']), 'seed')})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    verdict = _verdict(summary)
    if verdict:
        lines += ["", "## What the numbers say", "", *verdict]
    lines += ["", "## Learning-rate grid (best eval accuracy)", "", "| optimizer | lr | wd | mean | std | seeds |",
              "|---|---:|---:|---:|---:|---:|"]
    for g in summary["grid"]:
        lines.append(f"| {g['optimizer']} | {g['learning_rate']:g} | {g['weight_decay']:g} | "
                     f"{g['best_eval_accuracy_mean']:.4f} | {g['best_eval_accuracy_std']:.4f} | {g['seeds']} |")
    lines += ["", "Plots: `train_loss.png` (train loss vs step), `eval_accuracy.png` (eval accuracy vs step);"
              " lines are seed means, bands the seed min-max."]
    return "\n".join(lines) + "\n"


def _plot(best: dict[str, list[RunRecord]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for kind, key, ylabel, filename in (("train", "loss", "train loss", "train_loss.png"),
                                        ("eval", "eval_accuracy", "eval accuracy", "eval_accuracy.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for optimizer, runs in best.items():
            series = [{h["step"]: h[key] for h in r.history[kind] if key in h} for r in runs]
            steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
            if not steps:
                continue
            values = np.array([[s[step] for step in steps] for s in series])
            label = f"{optimizer} (lr {runs[0].learning_rate:g}, {plural(len(runs), 'seed')})"
            line = ax.plot(steps, values.mean(axis=0), label=label)[0]
            if len(runs) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    runs: Iterable[Run],
    out_dir: str | Path,
    *,
    title: str = "Lion vs AdamW",
    target_accuracy: float | None = None,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json`` (summary + every run) and the two PNG plots."""
    runs = _records(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, target_accuracy)
    (out_dir / "report.json").write_text(json.dumps({"title": title, "notes": notes or [], "summary": summary,
                                                     "runs": [r.to_dict() for r in runs]}, indent=2))
    (out_dir / "report.md").write_text(_markdown(summary, title, notes or []))
    plots = _plot(select_best(runs), out_dir)
    return {"markdown": out_dir / "report.md", "json": out_dir / "report.json",
            **{p.stem: p for p in plots}}


# ------------------------------------------------------------------------------------------
# Sweeps: the same comparison at several values of one setting (e.g. the global batch size)
# ------------------------------------------------------------------------------------------


def sweep_value(run: Run, key: str) -> Any:
    """The swept setting of a run: a :class:`RunRecord` field (e.g. ``global_batch_size``), else
    the argument of that name in its ``run_args``."""
    run = RunRecord.from_dict(run)
    if key in RunRecord.__dataclass_fields__:
        value = getattr(run, key)
        if value is not None:
            return value
    for group in (run.run_args or {}).values():
        if isinstance(group, Mapping) and key in group:
            return group[key]
    raise ValueError(f"run {run.name} (lr {run.learning_rate:g}, seed {run.seed}) does not record {key!r}")


def summarize_sweep(runs: Iterable[Run], key: str, target_accuracy: float | None = None) -> dict[str, Any]:
    """Per value of ``key``: :func:`summarize` of that value's runs (so each setup gets its best lr
    per value: the lr is re-tuned at every setting)."""
    runs = _records(runs)
    if not runs:
        raise ValueError("no runs to summarize")
    by_value: dict[Any, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_value[sweep_value(run, key)].append(run)
    values = sorted(by_value)
    return {"sweep": key, "values": values, "target_accuracy": target_accuracy,
            "per_value": {str(v): summarize(by_value[v], target_accuracy) for v in values}}


def _cell(metric: dict[str, float], fmt: str) -> str:
    if metric["n"] == 0:
        return "n/a"
    return fmt.format(metric["mean"]) + (" +/- " + fmt.format(metric["std"]) if metric["n"] > 1 else "")


def _sweep_markdown(summary: dict[str, Any], runs: list[RunRecord], title: str, notes: list[str]) -> str:
    key, values = summary["sweep"], summary["values"]
    setups = list(dict.fromkeys(name for v in values for name in summary["per_value"][str(v)]["optimizers"]))
    lines = [f"# {title}", "", *[f"- {n}" for n in notes], ""]
    lines += [f"## Best dev accuracy against {key}", "",
              "Mean +/- std over seeds; each setup at the best lr of its grid at that value (lr in brackets).", "",
              f"| {key} | " + " | ".join(setups) + " |", "|---:|" + "---:|" * len(setups)]
    for v in values:
        opts = summary["per_value"][str(v)]["optimizers"]
        cells = [f"{_cell(opts[s]['metrics']['best_eval_accuracy'], '{:.4f}')} (lr {opts[s]['learning_rate']:g})"
                 if s in opts else "not run" for s in setups]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "## Steps and time per run (at each setup's best lr)", "",
              f"| {key} | optimizer steps | " + " | ".join(f"{s} train s" for s in setups) + " |",
              "|---:|---:|" + "---:|" * len(setups)]
    steps_by_value: dict[Any, set[int]] = defaultdict(set)
    for r in runs:
        steps_by_value[sweep_value(r, key)].add(r.steps)
    for v in values:
        opts = summary["per_value"][str(v)]["optimizers"]
        steps = sorted(steps_by_value[v])
        cells = [_cell(opts[s]["metrics"]["train_seconds"], "{:.0f}") if s in opts else "not run" for s in setups]
        lines.append(f"| {v} | {'/'.join(map(str, steps))} | " + " | ".join(cells) + " |")
    lines += ["", "## What the numbers say", ""]
    for v in values:
        opts = summary["per_value"][str(v)]["optimizers"]
        ranked = sorted(opts, key=lambda s: -opts[s]["metrics"]["best_eval_accuracy"]["mean"])
        best = opts[ranked[0]]["metrics"]["best_eval_accuracy"]
        parts = []
        for s in ranked[1:]:
            m = opts[s]["metrics"]["best_eval_accuracy"]
            gap = best["mean"] - m["mean"]
            spread = max(best["std"], m["std"]) if min(best["n"], m["n"]) > 1 else None
            tie = (" (tied)" if gap == 0 else " (one seed: no spread)" if spread is None
                   else " (inside the seed spread)" if gap <= spread else "")
            parts.append(f"{s} {-gap:+.4f}{tie}")
        lines.append(f"- {key} {v}: best {ranked[0]} ({best['mean']:.4f})"
                     + (f"; then {', '.join(parts)}" if parts else "") + ".")
    for v in values:
        body = _markdown(summary["per_value"][str(v)], f"{key} = {v}", [])
        lines += [""] + [("##" + line[1:] if line.startswith("## ") else "### " + line[2:] if line.startswith("# ")
                          else line) for line in body.splitlines()
                         if not line.startswith("Plots:")]
    lines += ["", f"Plot: `sweep_accuracy.png` (best dev accuracy against {key}, mean over seeds, bars = std)."]
    return "\n".join(lines) + "\n"


def _plot_sweep(summary: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, values = summary["sweep"], summary["values"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    setups = list(dict.fromkeys(name for v in values for name in summary["per_value"][str(v)]["optimizers"]))
    for s in setups:
        xs, ys, es = [], [], []
        for v in values:
            opts = summary["per_value"][str(v)]["optimizers"]
            if s in opts:
                m = opts[s]["metrics"]["best_eval_accuracy"]
                xs.append(v), ys.append(m["mean"]), es.append(m["std"])
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=s)
    if all(isinstance(v, (int, float)) and v > 0 for v in values) and max(values) / min(values) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.set_xlabel(key)
    ax.set_ylabel("best dev accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "sweep_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_sweep_report(
    runs: Iterable[Run],
    out_dir: str | Path,
    key: str,
    *,
    title: str = "Lion vs AdamW",
    target_accuracy: float | None = None,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    """One report over a sweep of ``key``: ``report.md`` (a table of best dev accuracy against the
    swept value per setup, steps and time, and each value's full comparison), ``report.json``
    (summary + every run) and ``sweep_accuracy.png``."""
    runs = _records(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_sweep(runs, key, target_accuracy)
    (out_dir / "report.json").write_text(json.dumps({"title": title, "notes": notes or [], "summary": summary,
                                                     "runs": [r.to_dict() for r in runs]}, indent=2, default=str))
    (out_dir / "report.md").write_text(_sweep_markdown(summary, runs, title, notes or []))
    return {"markdown": out_dir / "report.md", "json": out_dir / "report.json",
            "sweep_accuracy": _plot_sweep(summary, out_dir)}
