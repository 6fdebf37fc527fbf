"""Output of a run: a text table, CSV, JSON and PNG plots (matplotlib, Agg, no pyplot state)."""
from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

from ..extras import MissingExtraError, require
from .cases import HEADLINE, ratio_sweep_repeats, shape_label
from .runner import COLUMNS, Report, json_safe
from .variants import VARIANTS

__all__ = ["format_table", "headline", "write_csv", "write_json", "plot_sweep", "write_all"]

_LEGEND = ("times: median [q1-q3] of interleaved repeats, per call; GB/s: bytes the op must move / "
           "median (taskrouting/benchmarking/traffic.py); %copy: that bandwidth / y.copy_(x) of the "
           "same tensor; xref, xcomp, xplain, xbase: median of repeat-by-repeat time ratios to the "
           "reference, the compiled reference, plain BN+ReLU, and the same variant at the sweep's "
           "baseline (T=1 / largest sigma; train step: the variant without its +option); < 1 is faster; "
           "saved: activations one training forward keeps for backward")


def _num(value, fmt: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, fmt)


def _environment_lines(report: Report) -> list[str]:
    env = report.environment
    gpu = f"{env['gpu']} (CUDA {env['cuda']}); host " if env.get("gpu") else ""
    lines = [f"device: {env['device']}: {gpu}{env['cpu']}, torch threads {env['threads']} of "
             f"{env['cpu_count']} cpus",
             f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
             f"taskrouting {env['taskrouting']} ({env['git_commit']}); backends: {', '.join(env['backends'])}",
             f"timer: {report.timer}; preset {report.settings['preset']}, {report.settings['repeats']} repeats "
             f"({ratio_sweep_repeats(report.settings['repeats'], report.settings.get('sweep_repeats'))} in the tasks "
             f"and sigma sweeps), "
             f"{report.settings['warmup']} warm-up calls"]
    if env.get("host_malloc", "default") != "default":
        lines.append(f"host memory: {env['host_malloc']}")
    rotate = report.settings.get("rotate_bytes")
    if env.get("device", "cpu").startswith("cpu") and rotate != 0:
        cache = env.get("last_level_cache_mib")
        lines.append(f"inputs: each call takes the next of several copies, together larger than "
                     f"{'the ' + str(cache) + ' MiB last-level cache' if rotate is None else str(rotate) + ' bytes'}, "
                     f"so that no call finds its input cached by the call before")
    return lines


_HEADER = (f"    {'variant':<16} {'median ms':>10} {'[q1 - q3]':>19} {'GB/s':>7} {'%copy':>6} "
           f"{'xref':>6} {'xcomp':>6} {'xplain':>6} {'xbase':>6} {'compile s':>9}")


def _row_line(row: dict) -> str:
    if row["status"] != "ok":
        return f"    {row['variant']:<16} {row['status']}: {row['reason']}"
    spread = f"[{row['q1_ms']:.4g} - {row['q3_ms']:.4g}]"
    pct = _num(row.get("copy_fraction") and 100 * row["copy_fraction"], ".0f")
    return (f"    {row['variant']:<16} {row['median_ms']:>10.4g} {spread:>19} {_num(row.get('gbps'), '.3g'):>7} "
            f"{pct:>6} {_num(row.get('vs_reference'), '.3f'):>6} {_num(row.get('vs_compiled'), '.3f'):>6} "
            f"{_num(row.get('vs_plain'), '.3f'):>6} {_num(row.get('vs_baseline'), '.3f'):>6} "
            f"{_num(row.get('compile_s'), '.2f'):>9}"
            + (f"  saved {row['saved_mib']:.1f} MiB" if row.get("saved_mib") is not None else ""))


def _case_title(row: dict) -> str:
    if row["sweep"] == "model":
        return f"  train step  T={row.get('num_tasks')} sigma={row.get('sharing_ratio')}"
    active = _num(row.get("active_fraction") and 100 * row["active_fraction"], ".0f", "?")
    stats = "" if row.get("stats", "batch") == "batch" else f" stats={row['stats']}"
    return (f"  {row['mode']}{stats}  T={row['num_tasks']} sigma={row['sharing_ratio']:g} "
            f"(active {active}% of channels)")


def format_table(report: Report) -> str:
    """The whole run as text: environment, headline, then one block per group and case."""
    lines = _environment_lines(report) + [""] + headline(report) + [""]
    group = case = None
    for row in report.rows:
        if (row["sweep"], row["shape"], row.get("dtype")) != group:
            group = (row["sweep"], row["shape"], row.get("dtype"))
            copy = next((r for r in report.rows if r["variant"] == "copy" and r["status"] == "ok"
                         and (r["sweep"], r["shape"], r["dtype"]) == group), None)
            extra = f"  (copy {copy['median_ms']:.4g} ms, {copy['gbps']:.3g} GB/s)" if copy else ""
            if (row.get("input_sets") or 1) > 1:
                extra += f"  [inputs rotate through {row['input_sets']} copies]"
            lines += ["", f"== {row['sweep']}: {row['shape']} {row.get('dtype') or ''}{extra}"]
            case = None
        if row["variant"] == "copy":
            continue
        if row.get("mode") is None:   # a skipped whole sweep (the model)
            lines.append(f"  {row['status']}: {row['reason']}")
            continue
        key = (row["mode"], row.get("num_tasks"), row.get("sharing_ratio"))
        if key != case:
            case = key
            lines += [_case_title(row), _HEADER]
        lines.append(_row_line(row))
    if report.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in report.notes]
    lines += ["", "variants: " + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()), _LEGEND]
    return "\n".join(lines)


def headline(report: Report) -> list[str]:
    """One line per fused backend for the headline case (16x128x56x56 fp32, sigma=0.5, train fwd+bwd)."""
    target = (shape_label(HEADLINE.shape), HEADLINE.dtype, HEADLINE.mode, HEADLINE.sharing_ratio)
    rows = [r for r in report.rows if r["status"] == "ok" and r["variant"].startswith("fused:")
            and (r["shape"], r["dtype"], r["mode"], r["sharing_ratio"]) == target]
    rows.sort(key=lambda r: r["num_tasks"] != report.settings["num_tasks"])   # the base T first
    lines, seen = [], set()
    for r in rows:
        if r["variant"] in seen:
            continue
        seen.add(r["variant"])
        ratios = ", ".join(f"{_num(r.get(f'vs_{n}'), '.3f')}x {n} [{_num(r.get(f'vs_{n}_q1'), '.3f')}-"
                           f"{_num(r.get(f'vs_{n}_q3'), '.3f')}]" for n in ("reference", "compiled", "plain")
                           if r.get(f"vs_{n}") is not None)
        lines.append(f"headline {r['shape']} {r['dtype']} {r['mode']} T={r['num_tasks']} sigma={r['sharing_ratio']:g}: "
                     f"{r['variant']} {r['median_ms']:.4g} ms = {ratios}")
    return lines or ["headline case (16x128x56x56 float32 train-fwdbwd sigma=0.5) not in this run"]


def _csv_value(value):
    return format(value, ".6g") if isinstance(value, float) else value


def write_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})


def write_json(report: Report, path: Path) -> None:
    payload = {"environment": report.environment, "settings": report.settings, "timer": report.timer,
               "variants": VARIANTS, "legend": _LEGEND, "notes": report.notes, "results": report.rows}
    path.write_text(json.dumps(json_safe(payload), indent=1, allow_nan=False, default=str))


def _series(rows: list[dict], axis: str) -> dict[tuple, dict[str, list[tuple]]]:
    """``{(shape, dtype, mode): {variant: [(x, median, q1, q3), ...]}}`` of the ok rows."""
    panels: dict[tuple, dict[str, list[tuple]]] = {}
    for r in rows:
        if r["status"] != "ok" or r["variant"] == "copy":
            continue
        panel = panels.setdefault((r["shape"], r["dtype"], r["mode"]), {})
        panel.setdefault(r["variant"], []).append((r[axis], r["median_ms"], r["q1_ms"], r["q3_ms"]))
    return panels


def plot_sweep(report: Report, sweep: str, axis: str, path: Path, log_x: bool = False) -> bool:
    """Time against ``axis`` (one panel per shape, dtype and mode); False if nothing to plot."""
    panels = _series([r for r in report.rows if r["sweep"] == sweep], axis)
    if not panels:
        return False
    Figure = require("matplotlib.figure", "plot", "plotting the benchmark").Figure  # no pyplot: no global state
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, ((shape, dtype, mode), series) in zip(axes, panels.items()):
        for variant, points in series.items():
            points.sort()
            xs, med, lo, hi = zip(*points)
            ax.errorbar(xs, med, yerr=[[m - low for m, low in zip(med, lo)], [h - m for m, h in zip(med, hi)]],
                        marker="o", capsize=3, label=variant, linestyle="--" if variant == "plain" else "-")
        if log_x:
            ax.set_xscale("log")
        ax.set_title(f"{shape} {dtype} {mode}", fontsize=10)
        ax.set_xlabel({"num_tasks": "number of tasks T", "sharing_ratio": "sharing ratio sigma"}.get(axis, axis))
        ax.set_ylabel("time per call (ms), median [q1-q3]")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    env = report.environment
    fig.suptitle(f"{sweep}: {env.get('gpu') or env['cpu']}, torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def plot_model(report: Report, path: Path) -> bool:
    """The training steps: per model, each variant's time ratio to the reference and its saved activations;
    False if nothing to plot."""
    rows = [r for r in report.rows if r["sweep"] == "model" and r["status"] == "ok"]
    models = list(dict.fromkeys(r["shape"] for r in rows))
    if not models:
        return False
    Figure = require("matplotlib.figure", "plot", "plotting the benchmark").Figure
    fig = Figure(figsize=(6.5 * len(models), 4.5), layout="constrained")
    for ax, model in zip(fig.subplots(1, len(models), squeeze=False)[0], models):
        series = [r for r in rows if r["shape"] == model]
        names = [r["variant"] for r in series]
        ratios = [r.get("vs_reference") or 1.0 for r in series]
        bars = ax.bar(range(len(series)), ratios, color="tab:blue")
        for bar, r in zip(bars, series):
            if r.get("saved_mib") is not None:
                ax.annotate(f"{r['saved_mib']:.3g} MiB", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(series)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("step time / reference (median of paired ratios)")
        ax.set_title(f"{model}: train step (labels: activations saved for backward)", fontsize=10)
    env = report.environment
    fig.suptitle(f"model: {env.get('gpu') or env['cpu']}, torch {env['torch']}", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def write_all(report: Report, out: Path, plots: bool = True) -> list[Path]:
    """Write table.txt, results.csv, results.json and the plots into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "table.txt", out / "results.csv", out / "results.json"]
    paths[0].write_text(format_table(report) + "\n")
    write_csv(report, paths[1])
    write_json(report, paths[2])
    if plots:
        try:
            for sweep, axis, log_x in (("tasks", "num_tasks", True), ("sharing_ratio", "sharing_ratio", False)):
                if plot_sweep(report, sweep, axis, out / f"{sweep}.png", log_x):
                    paths.append(out / f"{sweep}.png")
            if plot_model(report, out / "model.png"):
                paths.append(out / "model.png")
        except MissingExtraError as exc:  # the tables are written; the plots are optional
            warnings.warn(f"plots skipped: {exc}", stacklevel=2)
    return paths
