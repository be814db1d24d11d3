"""Launch helpers shared by the Triton kernel families."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Under the interpreter every program instance costs milliseconds of Python, so launches use as few
# (large) programs as possible; on a GPU blocks stay small enough to fill the SMs.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_INTERPRETED_BLOCK = 1 << 14


def block_size(n: int, gpu_block: int = 1024) -> int:
    """Elements per program for a 1-D launch over ``n`` elements (a power of two)."""
    if INTERPRETED:
        return min(triton.next_power_of_2(max(n, 1)), _MAX_INTERPRETED_BLOCK)
    return min(gpu_block, triton.next_power_of_2(max(n, 16)))


def accumulator(*tensors: torch.Tensor) -> tuple:
    """``(triton dtype, torch dtype)`` the kernels compute in for these operands: float64 only when one
    is float64 (gradcheck), otherwise float32 (the batch norms' statistics are float64 always, see
    batch_norm.py). Also the dtype of the partial sums and per-channel statistics they return."""
    if any(t.dtype == torch.float64 for t in tensors):
        return tl.float64, torch.float64
    return tl.float32, torch.float32


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's arithmetic would give these operands together: the kernels' result dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index flat memory; copy only what is not already contiguous."""
    return x if x.is_contiguous() else x.contiguous()
