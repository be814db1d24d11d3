"""Where one step's GPU time goes: the top kernels of a benchmark workload under torch.profiler.

    python -m benchmarks.profile_step --metric train --backend auto --batch 64 [--graph] [--top 15]

Prints a markdown table (kernel, calls, total ms, share of the step's kernel time) and the step's
total kernel time and launch count. ``--graph`` profiles the step captured as one CUDA graph
(the kernel times stay visible; the launch overhead is gone). GPU only.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import CudaGraphStep
from benchmarks.workloads import METRICS, Shape, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="train", choices=METRICS)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--graph", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    step = build(args.metric, Shape(f"b{args.batch}", args.batch, 32, 16, 8), args.backend, device)
    if args.graph:
        step = CudaGraphStep(step)  # after three eager warm-up steps on a side stream
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    totals, calls = defaultdict(float), defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3 / args.steps
            calls[event.name] += 1
    busy = sum(totals.values())
    launches = sum(calls.values()) / args.steps
    print(f"\n{args.metric}, backend {args.backend}{' as a CUDA graph' if args.graph else ''}, batch {args.batch}, "
          f"{torch.cuda.get_device_name()}: {busy:.1f} ms kernel time and {launches:.0f} kernels per step\n")
    print("| kernel | calls/step | ms/step | share |")
    print("|---|---|---|---|")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:args.top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"| `{short}` | {calls[name] / args.steps:.0f} | {ms:.2f} | {ms / busy:.0%} |")


if __name__ == "__main__":
    main()
