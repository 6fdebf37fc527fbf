"""benchmarks/gpu_check.sh: its stage budgets fit a short GPU lease, and its dry run (every stage on CPU
tensors) passes and writes the summary and at most 8 files."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


def test_stage_budgets_add_up_to_at_most_8_minutes():
    stages = re.search(r'^STAGES="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split()
    budgets = {name: int(seconds) for name, seconds in (s.split(":") for s in stages)}
    assert list(budgets) == ["build", "conformance_cuda", "conformance_triton", "gpu_checks", "bandwidth",
                             "tail_bandwidth", "memcheck"]
    assert sum(budgets.values()) <= 8 * 60


def test_dry_run_passes(tmp_path):
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for stage in ("build", "conformance_cuda", "conformance_triton", "gpu_checks", "bandwidth", "tail_bandwidth"):
        assert re.search(rf"^{stage}\s+ok\b", summary, re.M), summary
    assert re.search(r"^memcheck\s+skipped", summary, re.M), summary
    assert "all stages ok" in summary
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(p.parent == out for p in files), files
    assert (out / "bandwidth.txt").is_file() and (out / "bandwidth.json").is_file()
