"""Fast ops with their pure-PyTorch reference twins, one module per op family.

Each module registers its implementations with :mod:`dsrna.backend`; importing this package
registers all of them. The Triton implementations live in :mod:`dsrna.kernels` and register
themselves when it imports; without Triton they stay unregistered and `auto` uses another path.
"""

import warnings

from dsrna.ops.batch_norm import batch_norm_train, batch_norm_train_reference
from dsrna.ops.depthwise import (
    depthwise_conv2d,
    depthwise_conv2d_reference,
    depthwise_conv2d_stack,
    depthwise_conv2d_stack_reference,
    depthwise_conv2d_stack_transpose,
    depthwise_conv2d_stack_transpose_reference,
    depthwise_conv2d_transpose,
    depthwise_conv2d_transpose_reference,
)
from dsrna.ops.pointwise import pointwise_conv2d, pointwise_conv2d_reference
from dsrna.ops.pool_bn import pool_bn, pool_bn_reference
from dsrna.ops.weighted_sum import weighted_sum, weighted_sum_reference
from dsrna.ops import bound_ops  # noqa: F401  (registers the bound-propagation primitives)

try:
    import dsrna.kernels  # noqa: F401  (registers the triton backend)
except Exception as exc:  # no triton, or a triton too old for the kernels: never fail at import
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"dsrna: Triton kernels unavailable ({TRITON_IMPORT_ERROR}); using other backends", RuntimeWarning)
else:
    TRITON_IMPORT_ERROR = None

__all__ = [
    "batch_norm_train", "batch_norm_train_reference", "depthwise_conv2d", "depthwise_conv2d_reference",
    "depthwise_conv2d_stack", "depthwise_conv2d_stack_reference", "depthwise_conv2d_stack_transpose",
    "depthwise_conv2d_stack_transpose_reference", "depthwise_conv2d_transpose", "depthwise_conv2d_transpose_reference",
    "pointwise_conv2d", "pointwise_conv2d_reference", "pool_bn", "pool_bn_reference", "weighted_sum",
    "weighted_sum_reference",
]
