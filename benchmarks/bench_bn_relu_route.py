"""pytest-benchmark: the fused op against the reference, compiled reference, plain BN+ReLU and a copy,
for every case of the preset (see conftest.py for the environment variables)."""
from __future__ import annotations

import pytest
import torch

from taskrouting.benchmarking.cases import build_sweeps, settings_from_env, shape_label, unique_cases
from taskrouting.benchmarking.variants import (
    Inputs,
    Skip,
    build_step,
    check_fused,
    fused_backends,
    rotation_sets,
    variant_names,
)

pytest.importorskip("pytest_benchmark")

SETTINGS = settings_from_env()
BACKENDS, _ = fused_backends(SETTINGS.device)
VARIANTS = [v for v in variant_names(BACKENDS, SETTINGS.compile) if v != "copy"]
CASES = unique_cases(build_sweeps(SETTINGS))
TENSORS = list(dict.fromkeys((case.shape, case.dtype) for case in CASES))


def _ready(variant, case):
    torch._dynamo.reset()   # one test, one compiled graph
    inputs = Inputs.make(case.shape, case.torch_dtype, SETTINGS.device, SETTINGS.seed,
                         rotation_sets(case.shape, case.torch_dtype, SETTINGS.rotation_bytes()))
    try:
        if variant.startswith("fused:"):
            check_fused(variant, case, SETTINGS.device, inputs, SETTINGS.seed)
        return build_step(variant, case, SETTINGS.device, inputs, SETTINGS.seed)
    except Skip as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES, ids=[case.slug for case in CASES])
def test_bn_relu_route(time_step, case, variant):
    step = _ready(variant, case)
    time_step(step, SETTINGS.warmup, SETTINGS.device, group=case.label, shape=shape_label(case.shape),
              dtype=case.dtype, mode=case.mode, num_tasks=case.num_tasks, sharing_ratio=case.sharing_ratio)


@pytest.mark.parametrize("shape,dtype", TENSORS, ids=[f"{shape_label(s)}-{d}" for s, d in TENSORS])
def test_copy(time_step, shape, dtype):
    case = next(c for c in CASES if (c.shape, c.dtype) == (shape, dtype))
    step = _ready("copy", case)
    time_step(step, SETTINGS.warmup, SETTINGS.device, group=f"copy {shape_label(shape)} {dtype}",
              shape=shape_label(shape), dtype=dtype)
