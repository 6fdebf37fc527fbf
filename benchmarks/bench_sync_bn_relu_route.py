"""Synced routed BatchNorm: step time and all-reduce bytes per step, 1 vs 2 processes (gloo, CPU),
and the bytes per step by computation for VGG-11 and ResNet-50 (312 tasks, as for CUB).

    python benchmarks/bench_sync_bn_relu_route.py [--steps 20] [--batch 32]

Bytes: a synced routed layer with C channels all-reduces 4C float64 in forward (count·mean,
M2 + count·mean², count, routed-anywhere flags; 3C with stats="routed") and 2C float32 in backward;
an unrouted SyncTaskBatchNorm2d (a ResNet's shortcut BatchNorm) 3C float64 and 2C float32; a plain
nn.SyncBatchNorm all-gathers 2C+1 float32 per process in forward and all-reduces 2C in backward.
Payload per process; a ring all-reduce moves about 2·(P-1)/P times it over each link.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROUTED_FORWARD, ROUTED_BACKWARD = 4 * 8, 2 * 4  # bytes per channel
UNROUTED_FORWARD = 3 * 8  # SyncTaskBatchNorm2d: count·mean, M2 + count·mean², count; backward as routed


def model_bytes(name: str, num_tasks: int = 312, world: int = 8) -> dict:
    from taskrouting.nn import TaskBatchNorm2d
    from taskrouting.nn.bn_relu_route import BATCH_NORMS, _BNReLURoute
    from taskrouting.training.config import build_model

    model = build_model(name, num_tasks, 0.5, seed=0, pool_size=1, embedding_dim=2)
    routed = [m.num_features for m in model.modules() if isinstance(m, _BNReLURoute)]
    plain = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and not isinstance(m, _BNReLURoute)]
    routed_bytes = sum(routed) * (ROUTED_FORWARD + ROUTED_BACKWARD)
    plain_bytes = sum(m.num_features * (UNROUTED_FORWARD + ROUTED_BACKWARD) if type(m) is TaskBatchNorm2d
                      else world * (2 * m.num_features + 1) * 4 + 2 * m.num_features * 4 for m in plain)
    plain = [m.num_features for m in plain]
    return {"model": name, "routed_layers": len(routed), "routed_channels": sum(routed), "plain_layers": len(plain),
            "plain_channels": sum(plain), "collectives": 2 * (len(routed) + len(plain)),
            "bytes_per_step": routed_bytes + plain_bytes}


class _CountingGroup:
    """Counts the bytes handed to all_reduce (the synced layer's only collective)."""

    def __init__(self):
        self.bytes, self.calls = 0, 0
        self._all_reduce = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return self._all_reduce(tensor, *args, **kwargs)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._all_reduce


def _worker(rank, world, init_file, steps, batch, results):
    import taskrouting as tr
    from taskrouting.training.config import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = build_model("vgg11", 10, 0.5, seed=0, width_mult=0.25, in_channels=3)
    model = torch.nn.parallel.DistributedDataParallel(tr.convert_sync_batchnorm(model), broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch // world, 3, 32, 32), torch.rand(batch // world)
    tr.set_active_task(model, 0)
    times = []
    with _CountingGroup() as counter:
        for step in range(steps + 2):
            start = time.perf_counter()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
            if step == 1:
                counter.bytes, counter.calls = 0, 0
    if rank == 0:
        times = sorted(times[2:])
        results[world] = (times[len(times) // 2], counter.bytes / steps, counter.calls / steps)
    dist.destroy_process_group()


def step_times(steps: int, batch: int) -> dict:
    results = mp.Manager().dict()
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), steps, batch, results), nprocs=world)
    return dict(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="global batch (split over the processes)")
    args = parser.parse_args()
    print("| model | routed layers (channels) | plain BN layers (channels) | collectives/step | bytes/step, 8 procs |")
    print("|---|---|---|---|---|")
    for name in ("vgg11", "resnet50"):
        r = model_bytes(name)
        print(f"| {name} | {r['routed_layers']} ({r['routed_channels']}) | {r['plain_layers']} ({r['plain_channels']}) "
              f"| {r['collectives']} | {r['bytes_per_step'] / 1024:.1f} KiB |")
    print(f"\nVGG-11 width 0.25, 32x32, global batch {args.batch}, CPU gloo, 1 thread per process, median of "
          f"{args.steps} steps (synced-layer all-reduces counted; DDP's gradient all-reduce not included)")
    for world, (seconds, nbytes, calls) in sorted(step_times(args.steps, args.batch).items()):
        print(f"  {world} process(es): {1000 * seconds:.1f} ms/step, synced-BN all-reduce {nbytes / 1024:.1f} KiB/step "
              f"in {calls:.0f} calls")


if __name__ == "__main__":
    main()
