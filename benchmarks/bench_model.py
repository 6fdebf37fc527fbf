"""pytest-benchmark: one SGD training step of a routed VGG-11 and ResNet-50, fused vs reference vs no routing."""
from __future__ import annotations

import pytest

from taskrouting.benchmarking.cases import settings_from_env
from taskrouting.benchmarking.model import model_step, model_variants
from taskrouting.benchmarking.variants import Skip, fused_backends

pytest.importorskip("pytest_benchmark")

SETTINGS = settings_from_env()
BACKENDS, _ = fused_backends(SETTINGS.device)


@pytest.mark.parametrize("arch,variant", [(arch, variant) for arch in SETTINGS.model.archs
                                          for variant in model_variants(BACKENDS, SETTINGS.compile, arch)])
def test_model_train_step(time_step, arch, variant):
    try:
        step = model_step(variant, SETTINGS.model, SETTINGS.device, SETTINGS.seed, arch)
    except Skip as exc:
        pytest.skip(str(exc))
    time_step(step, SETTINGS.warmup, SETTINGS.device, group=f"{arch} {SETTINGS.model.label}")
