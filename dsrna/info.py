"""What this installation can run: versions, devices, and per device type which backends are built
and usable (and why not), which ops each backend implements, and what ``auto`` picks.

``dsrna.info()`` prints the report; ``collect()`` returns it as plain data (``dsrna info --json``).
"""

from __future__ import annotations

import platform
import sys
from typing import Any, TextIO

import torch

from dsrna import __version__, _native, backend

DEVICE_TYPES = ("cpu", "cuda")


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # reported with its reason by backend_status
        return None
    return triton.__version__


def _devices() -> list[dict[str, Any]]:
    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append({"type": "cuda", "index": i, "name": props.name,
                            "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2 ** 30, 1)})
    return devices


def collect() -> dict[str, Any]:
    """The report as a dict of plain values."""
    ops = backend.registered_ops()
    status = {device: {name: dict(zip(("usable", "reason"), backend.backend_status(name, device)))
                       for name in backend.BACKENDS}
              for device in DEVICE_TYPES}
    # Under use_backend("auto"): a request of "auto" means "the selected backend", and the report must
    # show auto's own choice also when DSRNA_BACKEND or a context selects another one.
    with backend.use_backend("auto"):
        auto = {device: {op: backend.resolve(op, device) for op in ops}
                for device in DEVICE_TYPES if device == "cpu" or torch.cuda.is_available()}
    return {
        "versions": {"dsrna": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda, "triton": _triton_version()},
        "devices": _devices(),
        "native_extension": {"loaded": _native.C is not None, "error": _native.LOAD_ERROR,
                             "built_with_cuda": _native.built_with_cuda(),
                             "built_with_openmp": _native.built_with_openmp()},
        "backends": status,
        "ops": {op: list(names) for op, names in ops.items()},
        "auto": auto,
        "selected_backend": backend.get_backend(),
    }


def format_report(data: dict[str, Any]) -> str:
    v = data["versions"]
    lines = [f"dsrna {v['dsrna']}",
             f"  python {v['python']}, torch {v['torch']} (CUDA {v['torch_cuda'] or 'none'}), "
             f"triton {v['triton'] or 'not installed'}", "devices:"]
    for d in data["devices"]:
        if d["type"] == "cpu":
            lines.append(f"  cpu: {d['name']}, {d['threads']} thread{'s' if d['threads'] != 1 else ''}")
        else:
            lines.append(f"  cuda:{d['index']}: {d['name']}, sm_{d['capability'].replace('.', '')}, {d['memory_gib']} GiB")
    if len(data["devices"]) == 1:
        lines.append("  cuda: none visible")
    ext = data["native_extension"]
    if ext["loaded"]:
        threads = "on torch's threads" if ext["built_with_openmp"] else "on one thread (built without OpenMP)"
        lines.append(f"native extension dsrna._C: loaded, {'with' if ext['built_with_cuda'] else 'without'} CUDA "
                     f"kernels, CPU kernels {threads}")
    else:
        lines.append(f"native extension dsrna._C: not loaded ({ext['error']})")
    lines.append(f"backend selected: {data['selected_backend']}")
    for device, backends in data["backends"].items():
        lines.append(f"backends for {device} tensors:")
        for name, s in backends.items():
            lines.append(f"  {name:<9} {'usable' if s['usable'] else 'unusable'}: {s['reason']}")
    lines.append("ops (backends implementing them; what auto picks):")
    width = max(map(len, data["ops"]), default=0)
    for op, names in data["ops"].items():
        picks = ", ".join(f"{device} -> {picked[op]}" for device, picked in data["auto"].items())
        lines.append(f"  {op:<{width}}  {', '.join(names):<28} auto: {picks}")
    return "\n".join(lines)


def info(file: TextIO | None = None) -> None:
    """Print the report (to stdout by default)."""
    print(format_report(collect()), file=file or sys.stdout)
