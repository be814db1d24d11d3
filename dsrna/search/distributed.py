"""torch.distributed plumbing of the search: process group from torchrun's environment, the two
collectives the architecture step needs (averaging gradients, broadcasting parameters), and failing
together (an error on one rank becomes an error on every rank instead of a hang).

Everything here is a no-op in a single process, so the search code has one path for both cases.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from dsrna.errors import DsrnaError


class PeerFailure(DsrnaError):
    """Another process of the run failed (its own message names the cause)."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_name() -> str:
    """The collective backend of this machine: NCCL when CUDA is available (one GPU per process,
    chosen by ``LOCAL_RANK``), gloo on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE > 1``) with :func:`backend_name`'s
    backend. Returns whether this call created the group (then the caller destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise DsrnaError("this PyTorch build has no torch.distributed: run one process")
    backend = backend_name()
    device_id = None
    if backend == "nccl":
        gpus = torch.cuda.device_count()
        # LOCAL_WORLD_SIZE is the same on all ranks of a node, so they all stop with the same line.
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank() + 1))
        if max(per_node, local_rank() + 1) > gpus:
            raise DsrnaError(f"{per_node} processes on this node but {gpus} GPU(s) visible: one process drives one "
                             f"GPU, so use --nproc_per_node {gpus} (or CUDA_VISIBLE_DEVICES= for gloo on CPU)")
        torch.cuda.set_device(local_rank())
        device_id = torch.device("cuda", local_rank())
    try:
        dist.init_process_group(backend, device_id=device_id)
    except dist.DistError as exc:  # rendezvous: unreachable address, port in use, timeout
        raise DsrnaError(f"cannot join the process group ({backend}, rank {os.environ.get('RANK', '?')} of "
                         f"{os.environ.get('WORLD_SIZE')}): {_first_line(exc)}") from None
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def default_device() -> torch.device:
    """This process's device: the GPU of its ``LOCAL_RANK`` when CUDA is available, else the CPU;
    also the CPU in a process group without NCCL (gloo chosen by the caller on a GPU machine)."""
    if dist.is_available() and dist.is_initialized() and "nccl" not in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_mean(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The average over ranks of each tensor, in one collective on a flat buffer."""
    tensors = list(tensors)
    if not is_distributed():
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's tensors with rank ``src``'s, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src)


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run a block on every rank and end it with one collective: if the block raised on any rank,
    every rank raises (the failing ranks their own exception, the others :class:`PeerFailure`
    naming it), so no rank goes on to wait in a collective that a failed peer never joins. The
    block itself must not run collectives. A no-op wrapper in a single process."""
    try:
        yield
    except Exception as exc:
        _agree(exc)
        raise
    _agree(None)


def _agree(error: BaseException | None) -> None:
    if not is_distributed():
        return
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=default_device())
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if int(failed.item()) == 0:
        return
    if error is None:
        mine = None
    elif isinstance(error, DsrnaError) and str(error).strip():
        mine = str(error).strip().splitlines()[0]  # the CLI prints these without their type
    else:
        mine = _first_line(error)
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, mine)
    if error is None:
        first = next(r for r, m in enumerate(messages) if m is not None)
        raise PeerFailure(f"rank {first} failed: {messages[first]}")


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that broke because another process went away (gloo reports
    a closed connection; NCCL an aborted communicator or a watchdog timeout)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "NCCL communicator was aborted",
                            "Connection refused"))


def peer_loss_error(exc: BaseException) -> PeerFailure:
    # gloo's text reads "[.../pair.cc:561] Connection closed by peer [addr]:port. This is typically ...".
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    text = text.split(". ")[0].rstrip(".")
    return PeerFailure(f"rank {rank()} lost contact with another process, which probably failed (see its "
                       f"message): {text}")
