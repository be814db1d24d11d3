import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Triton kernels run on CPU tensors only under the interpreter, which must be set before triton is
# imported (importing torch does not). Not on a GPU machine: there the interpreter would make every
# Triton-on-CUDA test skip and `auto` fall back to the native kernels, unseen.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    assert "triton" not in sys.modules, "set TRITON_INTERPRET=1 yourself: triton was imported before tests/conftest.py"
    os.environ["TRITON_INTERPRET"] = "1"

# The test tensors are tiny: intra-op threads cost more than they give, and oversubscribe the cores
# when tests start worker processes (distributed tests, CLI subprocesses).
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Tensors on a second GPU while the first is current: Triton launches, CUDA streams and graph
# captures use the current device unless the library makes the tensors' device current.
OTHER_GPU = ["cuda:1"] if torch.cuda.device_count() >= 2 else []


class OpsRun(TorchDispatchMode):
    """Records the operators that run below autograd (``dsrna.depthwise_conv2d``, ``aten.mm``...): a
    fast backend that quietly ran the reference would pass every comparison with it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def require_backend(name: str, device) -> None:
    """Skip by capability only (the GPU machine runs Triton without its interpreter, so no CPU tensors);
    an op a backend lacks runs on the reference path (dsrna.backend.resolve)."""
    from dsrna import backend

    ok, why = backend.backend_status(name, torch.device(device).type)
    if not ok:
        pytest.skip(f"{name} unavailable on {device}: {why}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def assert_error_within():
    """Check a fast result against the exact (float64) value: its error may be at most ``factor``
    times the reference implementation's own error in the same dtype, plus ``ulps`` units of the
    dtype's rounding at the result's scale (both compared results may be tensors or sequences)."""

    def check(fast, ref, exact, factor=2.0, ulps=4.0):
        fast, ref, exact = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (fast, ref, exact))
        assert len(fast) == len(ref) == len(exact)
        for i, (f, r, e) in enumerate(zip(fast, ref, exact)):
            assert f.shape == e.shape and f.dtype == r.dtype, (i, f.shape, e.shape, f.dtype, r.dtype)
            e = e.double()
            scale = e.abs().max().item() if e.numel() else 0.0
            ref_err = (r.double() - e).abs().max().item() if e.numel() else 0.0
            err = (f.double() - e).abs().max().item() if e.numel() else 0.0
            bound = factor * ref_err + ulps * torch.finfo(r.dtype).eps * scale
            assert err <= bound, f"result {i}: error {err:.3g} > {bound:.3g} (reference's own error {ref_err:.3g})"

    return check


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Blocks of 16 elements for the 1-D Triton kernels (weighted sum, bound ops). Interpreted, they
    otherwise run one program over a whole test tensor, so the code that splits the work across
    programs and loops over blocks would go untested (batch norm and pool_bn: their own fixtures)."""
    for module in ("weighted_sum", "bound_ops"):
        kernels = pytest.importorskip(f"dsrna.kernels.{module}")
        monkeypatch.setattr(kernels, "block_size", lambda n, gpu_block=1024: 16)


def refuse_new_files(monkeypatch) -> None:
    """From now on every folder refuses new files, as a read-only one does: the temporary file that
    each of dsrna's atomic writes starts with raises ``PermissionError``."""
    import dsrna.search.checkpoint as checkpoint

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)


def fit_mnist_mlp(hidden: int, n_test: int):
    """An MLP fitted for a second on 512 mnist-mini images: ``(model in eval mode, x_test, y_test)``
    with ``n_test`` test images. Attack and certification tests need a model that is actually right."""
    import torch.nn as nn
    import torch.nn.functional as F

    from dsrna.data import get_dataset

    torch.manual_seed(0)
    train, test = get_dataset("mnist-mini", train=True), get_dataset("mnist-mini", train=False)
    x = torch.stack([train[i][0] for i in range(512)])
    y = torch.tensor([train[i][1] for i in range(512)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    x_test = torch.stack([test[i][0] for i in range(n_test)])
    y_test = torch.tensor([test[i][1] for i in range(n_test)])
    return model.eval(), x_test, y_test
