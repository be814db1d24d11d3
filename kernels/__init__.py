"""Triton kernels, installed as the subpackage ``dsrna.kernels``.

Each module holds one kernel family with its launcher and ``torch.library`` registration, and
registers itself as the ``triton`` backend of the matching op in :mod:`dsrna.backend` on import.
Importing this package needs Triton; :mod:`dsrna.ops` imports it inside a guard.
"""

from . import weighted_sum  # noqa: F401
from . import batch_norm  # noqa: F401
from . import pool_bn  # noqa: F401
from . import bound_ops  # noqa: F401
