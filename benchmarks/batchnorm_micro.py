"""Train-mode batch norm without affine parameters, as the super-network runs it, forward + backward:
PyTorch's kernels against the fast backends' :func:`dsrna.ops.batch_norm_train`.

    python -m benchmarks.batchnorm_micro [--device cuda] [--batch 64,256]

Columns (median microseconds per forward + backward):

- ``reference``: ``F.batch_norm`` without weight, PyTorch's native kernels (the reference backend);
- ``unit weight``: the same with unit weight and zero bias, which lets PyTorch choose cuDNN's kernels
  on a GPU;
- ``native``: the fast backends' formulation on PyTorch's kernels (keeps the output, not the input);
- ``triton``: the same formulation on dsrna's Triton kernels (:mod:`dsrna.kernels.batch_norm`), with
  the memory bandwidth it reaches, counting the 32 bytes per element that the two passes each way
  move at the least in float32.

Shapes: the per-module batch norms of the three stages and the stem, and the stacked ones of the
batched search cell (the conv candidates of the edges leaving a state in one call: 4 edges x 4
candidates x 16 channels = 256 channels at 32x32 ...). On a GPU each column is timed as a CUDA graph
of ``CALLS`` back-to-back steps, divided by ``CALLS``: GPU time, as a replayed search step sees it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import CudaGraphStep, median_us
from dsrna import backend
from dsrna.ops import batch_norm_train

CALLS = 10
MODULES = [(16, 32), (32, 16), (64, 8), (48, 32)]  # (channels, side): the stages and the stem's 3C
STACKED = [(256, 32), (128, 32), (512, 16), (256, 16), (1024, 8), (512, 8)]
BYTES_PER_ELEMENT = 32  # float32: forward reads x twice and writes y; backward reads g, y twice, writes dx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    columns = ["reference", "unit weight"] + [b for b in ("native", "triton") if backend.backend_status(b, device.type)[0]
                                        and not (b == "triton" and device.type == "cpu")]  # interpreted: no timing
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# train-mode batch norm, affine=False, forward + backward, float32, {name}: median us per step\n")
    print("| batch | C | side | " + " | ".join(columns) + (" | triton GB/s |" if "triton" in columns else " |"))
    print("|---|---|---|" + "---|" * (len(columns) + ("triton" in columns)))
    totals = dict.fromkeys(columns, 0.0)
    for batch in (int(b) for b in args.batch.split(",")):
        for C, side in MODULES + STACKED:
            x = torch.randn(batch, C, side, side, device=device, requires_grad=True)
            g = torch.randn_like(x)
            mean, var = torch.zeros(C, device=device), torch.ones(C, device=device)
            ones, zeros = torch.ones(C, device=device), torch.zeros(C, device=device)

            def aten(weight, bias):
                return lambda: torch.autograd.grad(F.batch_norm(x, mean, var, weight, bias, True, 0.1), x, g)

            def fast(name):
                return lambda: torch.autograd.grad(batch_norm_train(x, mean, var, 0.1, 1e-5, name), x, g)

            steps = {"reference": aten(None, None), "unit weight": aten(ones, zeros), "native": fast("native"),
                     "triton": fast("triton")}
            cells = []
            for column in columns:
                step = steps[column]
                if device.type == "cuda":
                    calls = step
                    step = CudaGraphStep(lambda: [calls() for _ in range(CALLS)], warmup=1)
                us = median_us(step, device, args.repeats) / (CALLS if device.type == "cuda" else 1)
                totals[column] += us
                cells.append(f"{us:.0f}")
            if "triton" in columns:  # the last column's time
                cells.append(f"{BYTES_PER_ELEMENT * x.numel() / (us * 1e3):.0f}")
            print(f"| {batch} | {C} | {side} | " + " | ".join(cells) + " |")
    ratios = [f"{totals[c]:.0f}" + ("" if c == "reference" else f" ({totals['reference'] / totals[c]:.2f}x)")
              for c in columns]
    print("| all | | | " + " | ".join(ratios) + (" | |" if "triton" in columns else " |"))


if __name__ == "__main__":
    main()
