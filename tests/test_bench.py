"""The benchmark harness (taskrouting bench): a --quick smoke run and its pieces. Not speed."""
from __future__ import annotations

import csv
import dataclasses
import json
import sys

import pytest
import torch

from taskrouting import ops
from taskrouting.bench import build_parser, main, settings_from_args
from taskrouting.benchmarking import cases, model, runner, timing, traffic, variants
from taskrouting.benchmarking.cases import HEADLINE, Case


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick`` without torch.compile (cold compiles alone take ~30 s on 2 cores); the
    compiled variant is checked on its own below."""
    out = tmp_path_factory.mktemp("bench")
    code = main(["--quick", "--no-compile", "--out", str(out)])
    return code, out, json.loads((out / "results.json").read_text())


def test_quick_run_succeeds_and_writes_every_output(quick_run):
    code, out, _ = quick_run
    assert code == 0
    for name in ("table.txt", "results.csv", "results.json", "tasks.png", "sharing_ratio.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "results.csv") as f:
        assert csv.DictReader(f).fieldnames == runner.COLUMNS


def test_quick_run_reports_environment_and_every_variant(quick_run):
    _, _, data = quick_run
    env = data["environment"]
    for key in ("cpu", "torch", "triton", "threads", "device", "backends", "host_malloc"):
        assert key in env
    rows = [r for r in data["results"] if r["sweep"] != "model"]
    assert {r["sweep"] for r in rows} == {"shapes", "tasks", "sharing_ratio"}
    fused = [f"fused:{b}" for b in ops.available_backends("cpu") if b != "triton"]
    for variant in fused + ["reference", "plain", "copy"]:
        ok = [r for r in rows if r["variant"] == variant and r["status"] == "ok"]
        assert ok, f"no timed row for {variant}"
        assert all(r["median_ms"] > 0 and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] for r in ok)
        assert all(r["gbps"] > 0 and r["copy_fraction"] > 0 for r in ok)
    for r in rows:
        if r["variant"].startswith("fused:"):
            assert r["vs_reference"] > 0 and r["vs_plain"] > 0
    assert not any(r["variant"] == "compiled" for r in rows)
    assert any("--no-compile" in note for note in data["notes"])
    task_rows = [r for r in rows if r["sweep"] == "tasks" and r["variant"] == "reference"]
    assert {r["num_tasks"] for r in task_rows} == {1, 100}
    assert all(r["vs_baseline"] > 0 for r in task_rows if r["num_tasks"] != 1)


def test_quick_run_model_case_is_timed_or_skipped_with_a_message(quick_run):
    _, _, data = quick_run
    rows = [r for r in data["results"] if r["sweep"] == "model"]
    assert rows
    if rows[0]["status"] == "skipped":
        assert "taskrouting.models" in rows[0]["reason"]
    else:
        assert {r["variant"] for r in rows} >= {"reference", "plain"}
        assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)


def test_bytes_the_op_must_move():
    elems = 16 * 128 * 56 * 56
    e = elems * 4
    assert traffic.op_bytes(HEADLINE, 0.5) == (1 + 0.5 + 1 + 4 * 0.5 + 1) * e  # train fwd + bwd
    case = dataclasses.replace(HEADLINE, mode="eval-fwd")
    assert traffic.op_bytes(case, 0.25) == 1.25 * e
    assert traffic.op_bytes(dataclasses.replace(case, mode="eval-fwdbwd"), 0.5) == (1.5 + 2) * e
    assert traffic.op_bytes(dataclasses.replace(HEADLINE, mode="train-fwd", stats="routed"), 0.5) == 2 * e
    assert traffic.op_bytes(HEADLINE, 1.0) == 8 * e                                # plain BN + ReLU
    assert traffic.copy_bytes(HEADLINE.shape, 4) == 2 * e


def test_vgg11_shapes_and_presets():
    assert cases.vgg11_shapes(224, 32) == ((32, 64, 224, 224), (32, 128, 112, 112), (32, 256, 56, 56),
                                          (32, 512, 28, 28), (32, 512, 14, 14))
    default = cases.unique_cases(cases.build_sweeps(cases.preset("default", "cpu")))
    assert HEADLINE in default
    assert {c.num_tasks for c in default} >= set(cases.TASKS)
    assert {c.sharing_ratio for c in default} >= {0.2, 0.4, 0.6, 1.0}
    assert {c.dtype for c in default} == {"float32"}


def test_parse_shapes():
    assert cases.parse_shapes("16x128x56x56, 2x8") == ((16, 128, 56, 56), (2, 8))
    assert cases.parse_shapes("vgg11:112:16")[1] == HEADLINE.shape
    for bad in ("16x128x0x4", "16", "axb", "vgg11:224", ""):
        with pytest.raises(ValueError):
            cases.parse_shapes(bad)


def test_flags_override_the_preset():
    args = build_parser().parse_args([
        "--quick", "--shapes", "2x8x4x4", "--dtype", "bf16", "--tasks", "1,4096", "--sharing-ratios", "0.2",
        "--backends", "reference", "--no-compile", "--no-model", "--repeats", "2", "--modes", "eval-fwd"])
    s = settings_from_args(args)
    assert (s.preset, s.shapes, s.sweep_shapes, s.dtypes) == ("quick", ((2, 8, 4, 4),), ((2, 8, 4, 4),), ("bfloat16",))
    assert (s.tasks, s.sharing_ratios, s.backends, s.compile, s.repeats) == \
        ((1, 4096), (0.2,), ("reference",), False, 2)
    assert "model" not in s.sweeps and s.modes == s.sweep_modes == ("eval-fwd",)


def test_sweep_repeats_and_malloc_settings():
    s = settings_from_args(build_parser().parse_args(["--repeats", "4", "--malloc", "default"]))
    assert s.malloc == "default"
    by_name = {sweep.name: sweep for sweep in cases.build_sweeps(s)}
    assert by_name["shapes"].repeats(s) == 4 and by_name["tasks"].repeats(s) == 12
    s = settings_from_args(build_parser().parse_args(["--sweep-repeats", "7"]))
    assert s.malloc == "keep" and cases.build_sweeps(s)[1].repeats(s) == 7
    with pytest.raises(ValueError, match="malloc"):
        dataclasses.replace(s, malloc="jemalloc")
    with pytest.raises(ValueError, match="sweep_repeats"):
        dataclasses.replace(s, sweep_repeats=0)


def test_calls_rotate_through_the_input_sets():
    case = Case((2, 4, 3, 3), num_tasks=1, mode="eval-fwd")
    inputs = variants.Inputs.make(case.shape, case.torch_dtype, "cpu", sets=3)
    assert len({s.x.data_ptr() for s in inputs.sets}) == 3
    assert all(torch.equal(s.x, inputs.x) and torch.equal(s.grad_y, inputs.grad_y) for s in inputs.sets)
    inputs.sets[1].x.fill_(-1.0)   # BN then ReLU of a constant channel: all zeros
    step = variants.build_step("fused:reference", case, "cpu", inputs)
    outputs = [step.fn() for _ in range(4)]
    assert [bool(y.eq(0).all()) for y in outputs] == [False, True, False, False]
    assert torch.equal(outputs[0], outputs[3])


def test_rotation_sets_exceed_the_cache_within_limits():
    shape, f32 = (16, 128, 56, 56), torch.float32   # 25.7 MB per tensor, 4 per set
    assert variants.rotation_sets(shape, f32, 0) == 1
    assert variants.rotation_sets(shape, f32, 480 * 1024 ** 2) == 6
    assert variants.rotation_sets((2, 4, 3, 3), f32, 480 * 1024 ** 2) == 32
    assert variants.rotation_sets(shape, f32, 10 ** 12, max_bytes=300 * 1024 ** 2) == 3
    assert cases.preset("default", "cpu").rotation_bytes() == cases.last_level_cache_bytes() > 0
    with pytest.raises(ValueError, match="rotate_bytes"):
        dataclasses.replace(cases.preset("default", "cpu"), rotate_bytes=-1)


def test_keep_freed_memory_says_what_it_did():
    from taskrouting.benchmarking.allocator import keep_freed_memory
    said = keep_freed_memory()
    assert said.startswith("glibc") or said.startswith("default (")


@pytest.mark.parametrize("argv", [["--backends", "nope"], ["--device", "tpu"]])
def test_bad_settings_exit_2(argv, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2


def test_bad_flag_values_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["--shapes", "1x"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_exits_2(tmp_path):
    assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2


def test_triton_is_never_timed_on_cpu():
    chosen, notes = variants.fused_backends("cpu", ["triton"])
    assert chosen == [] and "interpreter" in notes[0]


def test_each_call_runs_the_next_task():
    case = Case((2, 8, 3, 3), num_tasks=5, mode="train-fwd")
    step = variants.build_step("reference", case, "cpu")
    seen = []
    step.module.router.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    for _ in range(7):
        step.fn()
    order = variants.task_order(5)
    assert seen == (order + order)[:7]


def test_compiled_reference_matches_eager_and_reports_compile_time():
    case = Case((2, 8, 3, 3), num_tasks=4, mode="train-fwdbwd")
    inputs = variants.Inputs.make(case.shape, case.torch_dtype, "cpu")
    torch._dynamo.reset()
    settings = dataclasses.replace(cases.preset("quick", "cpu"), warmup=1)
    measured = {v: runner._prepare(lambda v=v: variants.build_step(v, case, "cpu", inputs), None, settings,
                                   timing.CPUTimer()) for v in ("reference", "compiled")}
    assert measured["compiled"].ok, measured["compiled"].reason
    assert measured["compiled"].compile_s > 0 and measured["reference"].compile_s is None
    grads = {v: m.step.fn() for v, m in measured.items()}   # both at the same (fourth) task
    for eager, compiled in zip(grads["reference"], grads["compiled"]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_summaries_and_paired_ratios():
    s = timing.summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    r = timing.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r.median == r.min == r.max == 2.0


def test_a_failing_step_is_reported_not_raised():
    settings = cases.preset("quick", "cpu")

    def broken():
        raise RuntimeError("kernel exploded")
    m = runner._prepare(broken, None, settings, timing.CPUTimer())
    assert (m.status, m.reason) == ("failed", "RuntimeError: kernel exploded")


def test_model_missing_is_a_clear_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "taskrouting.models", None)
    settings = cases.preset("quick", "cpu")
    rows = runner.run_model(settings, [], timing.CPUTimer())
    assert rows[0]["status"] == "skipped" and "taskrouting.models.vgg11_bn" in rows[0]["reason"]


def test_strip_routing_leaves_plain_batchnorm():
    try:
        vgg11_bn = model.load_model("vgg11_bn")
    except variants.Skip as exc:
        pytest.skip(str(exc))
    net = model.strip_routing(vgg11_bn(3, width_mult=1 / 16, pool_size=1, fused=False, seed=0))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) and hasattr(m, "masks")
                   for m in net.modules())
    net.heads.active_task = 1
    assert net(torch.randn(2, 3, 32, 32)).shape == (2,)
