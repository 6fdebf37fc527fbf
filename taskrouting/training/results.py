"""Results of a run as files: JSON (nan/inf as null) and CSV."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["json_safe", "write_json", "write_csv", "write_results"]


def json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(obj, path: Path) -> None:
    """JSON with nan/inf written as null."""
    path.write_text(json.dumps(json_safe(obj), indent=2) + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))  # every row's keys (e.g. val_* on some epochs)
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_results(results: dict, out: Path) -> None:
    """``results.json`` (everything), ``per_task.csv`` and ``history.csv``."""
    serialisable = {k: v for k, v in results.items() if k not in ("metrics", "baseline")}
    write_json(serialisable, out / "results.json")
    write_csv(results["per_task"], out / "per_task.csv")
    write_csv(results["history"], out / "history.csv")
