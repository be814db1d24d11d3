"""Depthwise convolution of the DARTS family, native kernels against PyTorch's own, op by op.

    python -m benchmarks.depthwise_micro [--device cuda] [--batch 64,256] [--threads 2]

For every DARTS geometry (kernel 3/5, dilation 1/2, stride 1/2) at the super-network's shapes
(C=16 at 32x32, 32 at 16x16, 64 at 8x8) it times the forward, the input gradient and the weight
gradient: PyTorch (``F.conv2d`` and ``aten.convolution_backward``, i.e. cuDNN or PyTorch's depthwise
kernels on a GPU, oneDNN on a CPU) against ``torch.ops.dsrna.*``. Prints a markdown table of
medians in microseconds and the totals over all geometries; then the same for the stacked first stage
of the conv candidates of the ``EDGES`` edges leaving a state (``depthwise_conv2d_stack``: the
reference's copies, four convs and concatenation against the native op, on a GPU one fused kernel).

On a GPU each op is timed as a CUDA graph of ``CALLS`` back-to-back calls, divided by ``CALLS``: the
GPU time of the kernels, as a search step replayed from a CUDA graph sees it. (One call timed on
its own measures the host's dispatch, about 20 us for either side at these sizes.)
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import dsrna._C  # noqa: F401  (registers torch.ops.dsrna)
from benchmarks.harness import CudaGraphStep, median_us
from dsrna.ops import depthwise_conv2d_stack_reference

CALLS = 10


def graphed(op):
    """``CALLS`` calls of ``op`` replayed as one CUDA graph."""
    return CudaGraphStep(lambda: [op() for _ in range(CALLS)], warmup=1)

DARTS = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2)]  # (kernel, padding, dilation)
PLANES = [(16, 32), (32, 16), (64, 8)]  # (channels, side) of the three stages of the super-network
EDGES = 4  # the edges leaving an input state of a DARTS cell


def timed_pair(ref, nat, device, repeats) -> tuple[float, float]:
    """Median microseconds per call of the reference and the native op."""
    if device.type == "cuda":
        return tuple(median_us(graphed(op), device, repeats) / CALLS for op in (ref, nat))
    return median_us(ref, device, repeats), median_us(nat, device, repeats)


def stack_table(batches, device, repeats) -> None:
    paddings, dilations = [p for _, p, _ in DARTS], [d for _, _, d in DARTS]
    print(f"\n| batch | C | side | s | stacked first stage of {EDGES} edges |")
    print("|---|---|---|---|---|")
    total_ref = total_nat = 0.0
    for batch in batches:
        for C, side in PLANES:
            x = torch.randn(batch, C, side, side, device=device)
            ws = [torch.randn(EDGES, C, k, k, device=device) for k, _, _ in DARTS]
            for s in (1, 2):
                r, n = timed_pair(lambda: depthwise_conv2d_stack_reference(x, ws, s, paddings, dilations),
                                  lambda: torch.ops.dsrna.depthwise_conv2d_stack(x, ws, s, paddings, dilations),
                                  device, repeats)
                total_ref, total_nat = total_ref + r, total_nat + n
                print(f"| {batch} | {C} | {side} | {s} | {r:.0f} / {n:.0f} |")
    print(f"| all | | | | {total_ref:.0f} / {total_nat:.0f} ({total_ref / total_nat:.2f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="16", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    what = f"GPU us per call, from CUDA graphs of {CALLS} calls" if device.type == "cuda" else "us per call"
    print(f"# depthwise ops on {name}, torch {torch.__version__}: median {what} (PyTorch / native)\n")
    print("| batch | C | side | k | d | s | forward | input grad | weight grad |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals = [0.0] * 6
    batches = [int(b) for b in args.batch.split(",")]
    for batch in batches:
        for C, side in PLANES:
            x = torch.randn(batch, C, side, side, device=device)
            for k, p, d in DARTS:
                for s in (1, 2):
                    w = torch.randn(C, 1, k, k, device=device)
                    g = torch.randn_like(F.conv2d(x, w, None, s, p, d, C))
                    conv_args = (None, [s, s], [p, p], [d, d], False, [0, 0], C)
                    pairs = [
                        (lambda: F.conv2d(x, w, None, s, p, d, C),
                         lambda: torch.ops.dsrna.depthwise_conv2d(x, w, s, p, d)),
                        (lambda: torch.ops.aten.convolution_backward(g, x, w, *conv_args, [True, False, False]),
                         lambda: torch.ops.dsrna.depthwise_conv2d_transpose(g, w, [side, side], s, p, d)),
                        (lambda: torch.ops.aten.convolution_backward(g, x, w, *conv_args, [False, True, False]),
                         lambda: torch.ops.dsrna.depthwise_conv2d_weight(x, g, k, s, p, d)),
                    ]
                    cells = []
                    for i, (ref, nat) in enumerate(pairs):
                        r, n = timed_pair(ref, nat, device, args.repeats)
                        totals[2 * i] += r
                        totals[2 * i + 1] += n
                        cells.append(f"{r:.0f} / {n:.0f}")
                    print(f"| {batch} | {C} | {side} | {k} | {d} | {s} | " + " | ".join(cells) + " |")
    print(f"| all | | | | | | {totals[0]:.0f} / {totals[1]:.0f} ({totals[0] / totals[1]:.2f}x) | "
          f"{totals[2]:.0f} / {totals[3]:.0f} ({totals[2] / totals[3]:.2f}x) | "
          f"{totals[4]:.0f} / {totals[5]:.0f} ({totals[4] / totals[5]:.2f}x) |")
    stack_table(batches, device, args.repeats)


if __name__ == "__main__":
    main()
