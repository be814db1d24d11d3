"""Fast ops with their pure-PyTorch reference twins, one module per op family.

Each module registers its implementations with :mod:`dsrna.backend`; importing this package
registers all of them. Fast implementations that cannot load (no Triton, no built extension)
simply stay unregistered and the reference path is used.
"""

from dsrna.ops.depthwise import depthwise_conv2d, depthwise_conv2d_reference
from dsrna.ops.weighted_sum import weighted_sum, weighted_sum_reference

__all__ = ["depthwise_conv2d", "depthwise_conv2d_reference", "weighted_sum", "weighted_sum_reference"]
