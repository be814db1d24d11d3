"""Train-mode batch norm without affine parameters, as the super-network runs it ~700 times a step,
against the same normalisation with explicit unit weight and zero bias (which lets PyTorch choose
cuDNN's kernels), forward + backward.

    python -m benchmarks.batchnorm_micro [--device cuda] [--batch 64]

The H100 profile (benchmarks/results/2026-11-26_nvidia-h100_profile.md) puts a third of the train
step in PyTorch's native batch-norm kernels; this measures whether cuDNN's do better at these shapes
before the library changes how its batch norms are called. Prints median microseconds per shape.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import median_us

SHAPES = [(16, 32), (32, 16), (64, 8), (48, 32)]  # (channels, side): the stages, and the stem's 3C


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# train-mode batch norm, forward + backward, batch {args.batch}, {device}: median us\n")
    print("| C | side | affine=False (no weight) | unit weight, zero bias |")
    print("|---|---|---|---|")
    for C, side in SHAPES:
        x = torch.randn(args.batch, C, side, side, device=device, requires_grad=True)
        g = torch.randn_like(x)
        mean, var = torch.zeros(C, device=device), torch.ones(C, device=device)
        ones, zeros = torch.ones(C, device=device), torch.zeros(C, device=device)

        def step(weight, bias):
            y = F.batch_norm(x, mean, var, weight, bias, training=True, momentum=0.1)
            (grad,) = torch.autograd.grad(y, x, g)
            return grad

        plain = median_us(lambda: step(None, None), device, args.repeats)
        unit = median_us(lambda: step(ones, zeros), device, args.repeats)
        print(f"| {C} | {side} | {plain:.0f} | {unit:.0f} |")


if __name__ == "__main__":
    main()
