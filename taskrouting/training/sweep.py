"""Sweep the sharing ratio σ (and optionally the number of tasks) over one or several seeds:
train and evaluate each setting, then write a table like the paper's Tables 1 and 2 (mean ±
standard deviation over seeds) and plots of the scores against σ (and the number of tasks), with
error bars. Runs of one sweep may be split across invocations that write into the same folder
(e.g. one seed each): the table covers every finished run found there. Optionally each run is
also compared with single-task baselines (Δm, ``taskrouting.training.baselines``)."""
from __future__ import annotations

import json
import math
import statistics
import warnings
from pathlib import Path

from ..data import MultiTaskDataset
from ..extras import MissingExtraError, require
from .baselines import DELTA_SCORES, delta_m, sample_tasks, single_task_baselines
from .config import ModelBuildError, TrainConfig
from .loop import run_experiment
from .results import write_csv, write_json

__all__ = ["sweep", "summarize", "collect_runs", "format_markdown", "plot_sweep", "write_sweep", "SCORES"]

SCORES = ("accuracy", "precision", "recall")
SUMMARY = (*SCORES, "f1", "majority_accuracy", *(f"delta_m_{s}" for s in DELTA_SCORES))
# settings that may differ between runs merged into one table
_FREE = ("seed", "num_workers", "device")


def _run_dir(out: Path, num_tasks: int, sharing_ratio: float, seed: int | None = None) -> Path:
    return out / (f"tasks{num_tasks}_sigma{sharing_ratio:g}" + ("" if seed is None else f"_seed{seed}"))


def _row(num_tasks: int, sharing_ratio: float, results: dict | None, error: str = "", seed: int = 0,
         single: dict | None = None) -> dict:
    if results is None:
        return {"num_tasks": num_tasks, "sharing_ratio": sharing_ratio, "seed": seed,
                **{k: math.nan for k in (*SCORES, "f1")}, "majority_accuracy": math.nan, "final_loss": math.nan,
                "train_seconds": math.nan, "best_epoch": math.nan,
                **{f"delta_m_{s}": math.nan for s in DELTA_SCORES}, "delta_m_tasks": 0, "error": error}
    history, selection = results["history"], results.get("selection") or {}
    row = {"num_tasks": num_tasks, "sharing_ratio": sharing_ratio, "seed": seed, **results["means"],
           "majority_accuracy": results["majority_baseline"]["accuracy"],
           "final_loss": history[-1]["loss"] if history else math.nan,
           "train_seconds": results["train_seconds"], "best_epoch": selection.get("best_epoch", math.nan)}
    row.update({f"delta_m_{s}": math.nan for s in DELTA_SCORES}, delta_m_tasks=0)
    if single is not None:
        per_task = {r["task"]: r for r in results["per_task"]}
        for score in DELTA_SCORES:
            row[f"delta_m_{score}"], row["delta_m_tasks"] = delta_m(per_task, single, score)
    row["error"] = ""
    return {k: math.nan if v is None else v for k, v in row.items()}  # JSON wrote nan as null


def _finished(run_dir: Path | None, epochs: int) -> dict | None:
    if run_dir is None or not (run_dir / "results.json").is_file():
        return None
    results = json.loads((run_dir / "results.json").read_text())
    return results if results.get("history") and results["history"][-1]["epoch"] >= epochs else None


def sweep(dataset: MultiTaskDataset, sharing_ratios, task_counts=None, model_name: str = "vgg11",
          model_kwargs: dict | None = None, config: TrainConfig | None = None, out=None, resume: bool = False,
          progress: bool = True, log=print, seeds=None, single_task: int | None = None) -> list[dict]:
    """One run per (task count, σ, seed): the first ``k`` tasks of ``dataset`` (all when
    ``task_counts`` is None), for each seed of ``seeds`` (None: the one of ``config``). Each run
    writes into ``out/tasks<k>_sigma<σ>/`` (``..._seed<n>/`` when ``seeds`` is given); with
    ``resume``, finished runs are read back and interrupted ones continue from their checkpoint.
    A setting the model cannot be built for (σ = 0 with more tasks than channels) is reported
    as n/a. ``single_task``: also train single-task baselines for that many tasks (a fixed
    sample of the first ``min(task_counts)``; into ``out/single_task_seed<n>/``) and report each
    run's Δm. Returns one row of mean scores per run of this call; with ``out``, writes the
    table and plots of every finished run in ``out`` (``collect_runs``)."""
    config = config or TrainConfig()
    out = Path(out) if out is not None else None
    counts = task_counts or [dataset.num_tasks]
    baseline_tasks = sample_tasks(min(counts), single_task) if single_task is not None else None
    rows = []
    for seed in seeds if seeds is not None else [config.seed]:
        run_config = TrainConfig(**{**config.__dict__, "seed": seed})
        single = None
        if baseline_tasks is not None:
            single = single_task_baselines(dataset, baseline_tasks, model_name, model_kwargs, run_config,
                                           out / f"single_task_seed{seed}" if out is not None else None, resume,
                                           progress, log)
        for num_tasks in counts:
            data = dataset if num_tasks == dataset.num_tasks else dataset.select_tasks(num_tasks)
            for sharing_ratio in sharing_ratios:
                run_dir = _run_dir(out, num_tasks, sharing_ratio, seed if seeds is not None else None) \
                    if out is not None else None
                log(f"== {num_tasks} tasks, sharing ratio {sharing_ratio:g}, seed {seed}")
                results = _finished(run_dir, config.epochs) if resume else None
                if results is None:
                    try:
                        results = run_experiment(data, model_name, sharing_ratio, run_config, model_kwargs, run_dir,
                                                 resume, progress, log)
                    except ModelBuildError as exc:
                        log(f"   n/a: {exc}")
                        rows.append(_row(num_tasks, sharing_ratio, None, str(exc), seed))
                        continue
                rows.append(_row(num_tasks, sharing_ratio, results, seed=seed, single=single))
                log("   " + ", ".join(f"{k} {100 * rows[-1][k]:.1f}" for k in (*SCORES, "majority_accuracy")))
    if out is not None:
        write_sweep(collect_runs(out, rows, config, model_name, model_kwargs), out)
    return rows


def _settings(results: dict) -> dict:
    config = {k: v for k, v in results["config"].items() if k not in _FREE}
    return {"dataset": results["dataset"], "model_name": results.get("model_name"),
            "model_kwargs": results.get("model_kwargs"), "train_samples": results["train_samples"],
            "eval_samples": results["eval_samples"], "config": config}


def collect_runs(out, rows: list[dict], config: TrainConfig, model_name: str, model_kwargs: dict | None) -> list[dict]:
    """``rows`` (this call's runs) plus every other finished run of ``config.epochs`` epochs in
    ``out`` (a run folder per (tasks, σ, seed) with ``results.json``; ``single_task_seed<n>/``
    holds the baselines), in (tasks, σ, seed) order. A finished run trained with other settings
    (model, widths, data sizes, hyper-parameters other than the seed) is an error: its scores
    would not belong in the same table."""
    out = Path(out)
    merged = {(r["num_tasks"], r["sharing_ratio"], r["seed"]): r for r in rows}
    expected = {k: v for k, v in config.__dict__.items() if k not in _FREE}
    for path in sorted(out.glob("tasks*_sigma*/results.json")):
        results = _finished(path.parent, config.epochs)
        if results is None:
            continue
        key = (results["num_tasks"], results["sharing_ratio"], results["config"]["seed"])
        if key in merged:
            continue
        settings = _settings(results)
        wanted = {"model_name": model_name, "model_kwargs": dict(model_kwargs or {}), "config": expected}
        differ = {k: (settings[k], v) for k, v in wanted.items() if settings[k] != v}
        if differ:
            raise ValueError(f"{path.parent} was trained with other settings than this sweep "
                             f"(found, expected): {differ}; use another --out")
        seed = key[2]
        baseline_dir = out / f"single_task_seed{seed}"
        single = {p.parent.name: json.loads(p.read_text())["per_task"][0]
                  for p in sorted(baseline_dir.glob("*/results.json"))} if baseline_dir.is_dir() else None
        merged[key] = _row(*key[:2], results, seed=seed, single=single or None)
    return [merged[k] for k in sorted(merged)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (task count, σ): the seeds, and for every score its mean, sample standard
    deviation (n - 1; 0 for one seed) and per-seed values. Runs that could not be built are
    left out of the means; a setting with none built has NaN scores and the error."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["num_tasks"], r["sharing_ratio"]), []).append(r)
    summary = []
    for (num_tasks, sharing_ratio), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        built = [r for r in runs if not r["error"]]
        entry = {"num_tasks": num_tasks, "sharing_ratio": sharing_ratio, "seeds": [r["seed"] for r in built],
                 "error": "" if built else runs[0]["error"]}
        for score in SUMMARY:
            values = [r.get(score, math.nan) for r in built]
            entry[f"{score}_mean"], entry[f"{score}_std"] = _mean_std(values)
            entry[f"{score}_per_seed"] = values
        summary.append(entry)
    return summary
def _sigma_order(sharing_ratios) -> list[float]:
    """The paper's row order: σ = 0 and σ = 1 (no sharing, hard sharing) first, then the rest."""
    ends = [s for s in (0.0, 1.0) if s in sharing_ratios]
    return ends + sorted(s for s in sharing_ratios if s not in ends)


def _cell(mean: float, std: float, seeds: int, best: bool) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")
    return f"**{text}**" if best else text


def format_markdown(rows: list[dict]) -> str:
    """Rows σ, columns (task count × accuracy/precision/recall, and Δm of F1 when the runs have
    single-task baselines), scores in % as the mean over seeds ± their standard deviation (just the
    value for one seed), best mean per column in bold; the last row is the majority-class baseline's
    accuracy. ``rows``: one per run (``sweep``'s rows)."""
    summary = summarize(rows)
    counts = sorted({r["num_tasks"] for r in summary})
    sigmas = _sigma_order(sorted({r["sharing_ratio"] for r in summary}))
    table = {(r["num_tasks"], r["sharing_ratio"]): r for r in summary}
    with_delta = [k for k in counts if any(not math.isnan(r["delta_m_f1_mean"]) for r in summary
                                           if r["num_tasks"] == k)]
    columns = [(k, s) for k in counts for s in (*SCORES, *(["delta_m_f1"] if k in with_delta else []))]
    header = ["Approach"] + [f"{k} tasks {'Δm F1' if s == 'delta_m_f1' else s.capitalize()}" for k, s in columns]
    best = {(k, s): max((r[f"{s}_mean"] for r in summary if r["num_tasks"] == k
                         and not math.isnan(r[f"{s}_mean"])), default=math.nan) for k, s in columns}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for sigma in sigmas:
        cells = [f"σ = {sigma:g}"]
        for k, s in columns:
            row = table.get((k, sigma))
            cells.append(_cell(row[f"{s}_mean"], row[f"{s}_std"], len(row["seeds"]),
                               row[f"{s}_mean"] == best[(k, s)]) if row else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    baseline = ["majority class"]
    for k, s in columns:
        row = next((r for r in summary if r["num_tasks"] == k and not math.isnan(r["majority_accuracy_mean"])), None)
        baseline.append(_cell(row["majority_accuracy_mean"], row["majority_accuracy_std"], len(row["seeds"]), False)
                        if s == "accuracy" and row else "")
    lines.append("| " + " | ".join(baseline) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict], out: Path) -> list[Path]:
    """``sweep.png``: accuracy, precision, recall against σ (a line per task count, error bars: the
    standard deviation over seeds); with several task counts, also ``sweep_tasks.png``: the same
    against the number of tasks (a line per σ)."""
    Figure = require("matplotlib.figure", "plot", "plotting the sweep").Figure  # no pyplot: Agg, no display

    summary = summarize(rows)
    counts = sorted({r["num_tasks"] for r in summary})
    sigmas = sorted({r["sharing_ratio"] for r in summary})
    plots = [("sweep.png", "sharing ratio σ", "sharing_ratio", "num_tasks", counts, "{:g} tasks")]
    if len(counts) > 1:
        plots.append(("sweep_tasks.png", "number of tasks", "num_tasks", "sharing_ratio", sigmas, "σ = {:g}"))
    paths = []
    for name, xlabel, x_key, line_key, line_values, label in plots:
        fig = Figure(figsize=(12, 3.6), layout="constrained")
        for axes, score in zip(fig.subplots(1, 3), SCORES):
            for value in line_values:
                points = sorted((r[x_key], 100 * r[f"{score}_mean"], 100 * r[f"{score}_std"]) for r in summary
                                if r[line_key] == value and not math.isnan(r[f"{score}_mean"]))
                if not points:
                    continue
                x, y, err = zip(*points)
                line = axes.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label.format(value)).lines[0]
                base = [r["majority_accuracy_mean"] for r in summary if r[line_key] == value
                        and not math.isnan(r["majority_accuracy_mean"])]
                if score == "accuracy" and x_key == "sharing_ratio" and base:
                    axes.axhline(100 * base[0], linestyle="--", linewidth=1, color=line.get_color(),
                                 label=f"majority class, {label.format(value)}")
            axes.set(xlabel=xlabel, ylabel=f"mean {score} (%)", title=score)
            axes.grid(alpha=0.3)
        fig.axes[0].legend(fontsize="small")
        fig.savefig(out / name, dpi=120)
        paths.append(out / name)
    return paths


def write_sweep(rows: list[dict], out: Path) -> None:
    """``sweep.csv``/``sweep.json`` (one row per run: the per-seed values), ``sweep_summary.csv``/
    ``sweep_summary.json`` (mean, std and per-seed values per setting), ``sweep.md`` and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "sweep.csv")
    write_json(rows, out / "sweep.json")
    summary = summarize(rows)
    write_json(summary, out / "sweep_summary.json")
    write_csv([{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in summary],
              out / "sweep_summary.csv")
    (out / "sweep.md").write_text(format_markdown(rows))
    try:
        plot_sweep(rows, out)
    except MissingExtraError as exc:  # the tables are written; the plots are optional
        warnings.warn(f"plots skipped: {exc}", stacklevel=2)
