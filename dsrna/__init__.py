"""dsrna: differentiable search of robust neural architectures (DSRNA, CVPR 2021), fast.

The reference path is pure PyTorch and always works; Triton kernels and the native extension
``dsrna._C`` plug in underneath through :mod:`dsrna.backend` when they are available.
"""

__version__ = "0.1.0"

from dsrna.backend import get_backend, set_backend, use_backend
from dsrna import ops as _ops  # noqa: F401  (registers the op implementations)
from dsrna.info import info
from dsrna.space import DARTS_V1, DARTS_V2, PRIMITIVES, Genotype, Network, SearchNetwork

__all__ = [
    "__version__", "info", "get_backend", "set_backend", "use_backend",
    "DARTS_V1", "DARTS_V2", "PRIMITIVES", "Genotype", "Network", "SearchNetwork",
]
