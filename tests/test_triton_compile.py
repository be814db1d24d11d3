"""Every Triton kernel compiles for an H100/H200 (sm_90) as a GPU runs it: in float32, float64 and,
for the kernels that autocast reaches, bfloat16; with integer arguments as plain i32 and, for the
batch norm's, specialised to 1 as Triton does for arguments equal to 1.

The other Triton tests run the kernels under the interpreter, which accepts code the compiler
refuses (a loop-carried value that changes type, a method of a Python float, a block shape that is
not a power of two). This compiles ahead of time in a subprocess without ``TRITON_INTERPRET``: it
needs Triton's bundled ``ptxas``, no GPU.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

# kernel -> constexpr sets to compile (every dtype below is added as "dt"); "ACC" is the accumulator of
# the dtype. Pointers are of dtype "dt" unless named in POINTERS; scalars are i32 unless in FLOATS.
KERNELS = {
    "weighted_sum._weighted_sum_kernel": [dict(N=3, ROWS=rows, BLOCK=1024) for rows in (False, True)],
    "weighted_sum._weighted_sum_grad_kernel": [dict(N=3, ROWS=True, SCALE=scale, DOT=not scale, BLOCK=1024)
                                               for scale in (False, True)],
    **{f"batch_norm.{name}": [dict(BLOCK_N=2, BLOCK_HW=1024, S_BLOCK=64), dict(BLOCK_N=32, BLOCK_HW=64, S_BLOCK=1,
                                                                               N=1, HW=1, C=1, CHUNK_N=1, S=1)]
       for name in ("_moments_kernel", "_normalise_kernel", "channel_sums_kernel", "_grad_kernel")},
    "pool_bn._pool_stats_kernel": [dict(KIND_MAX=kind_max, STRIDE=2, BLOCK=1024) for kind_max in (False, True)],
    "pool_bn._pool_bn_apply_kernel": [dict(KIND_MAX=kind_max, STRIDE=1, TRAINING=training, BLOCK=1024, S_BLOCK=64)
                                      for kind_max in (False, True) for training in (False, True)],
    "pool_bn._pool_bn_grad_kernel": [dict(KIND_MAX=kind_max, STRIDE=2, TRAINING=training, BLOCK=1024, S_BLOCK=64,
                                          WINDOWS=2) for kind_max in (False, True) for training in (False, True)],
    "bound_ops._relu_relaxation_kernel": [dict(FAST_LIN=fast, BLOCK=1024) for fast in (False, True)],
    "bound_ops._crown_relu_backward_kernel": [dict(BLOCK=1024)],
}
DTYPES = {"fp32": "fp32", "fp64": "fp64", "bf16": "fp32"}  # dtype -> accumulator
HALF = {"weighted_sum._weighted_sum_kernel", "weighted_sum._weighted_sum_grad_kernel", "pool_bn._pool_stats_kernel",
        "pool_bn._pool_bn_apply_kernel", "pool_bn._pool_bn_grad_kernel", "batch_norm.channel_sums_kernel"}
POINTERS = {"part_ptr": "*fp64", "arg_ptr": "*i8", "nbt_ptr": "*i64", "partial_ptr": "*{acc}", "invstd_ptr": "*{acc}",
            "stats_ptr": "*{acc}"}
FLOATS = {"momentum_hi", "momentum_lo", "eps_hi", "eps_lo"}
TUPLES = {"xs": "*{dt}", "gxs": "*{dt}", "row_strides": "i64"}  # one per input (N)

SCRIPT = r"""
import importlib, json, pkgutil, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dsrna.kernels

spec = json.loads(sys.argv[1])
modules = [m.name for m in pkgutil.iter_modules(dsrna.kernels.__path__) if not m.name.startswith("_")]
seen = {f"{module}.{name}" for module in modules
        for name, obj in vars(importlib.import_module(f"dsrna.kernels.{module}")).items()
        if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")
        and obj.fn.__module__ == f"dsrna.kernels.{module}"}  # defined there, not imported
missing = seen - set(spec["kernels"])
assert not missing, f"kernels without a compile entry in tests/test_triton_compile.py: {sorted(missing)}"
for key, configs in spec["kernels"].items():
    module, name = key.split(".")
    fn = getattr(getattr(dsrna.kernels, module), name)
    for dt, acc in spec["dtypes"].items():
        if dt == "bf16" and key not in spec["half"]:
            continue
        for constexprs in configs:
            constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}  # a shared config
            if "ACC" in fn.arg_names:
                constexprs["ACC"] = getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc])
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg in spec["tuples"]:
                    signature[arg] = (spec["tuples"][arg].format(dt=dt),) * constexprs["N"]
                elif arg in spec["pointers"]:
                    signature[arg] = spec["pointers"][arg].format(acc=acc)
                elif arg.endswith("_ptr"):
                    signature[arg] = "*" + dt
                else:
                    signature[arg] = "fp32" if arg in spec["floats"] else "i32"
            try:
                triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                               target=GPUTarget("cuda", 90, 32))
            except Exception as exc:
                raise SystemExit(f"{key} {dt} {constexprs}: {type(exc).__name__}: {exc}")
print("compiled", len(spec["kernels"]), "kernels")
"""


def test_every_kernel_compiles_for_sm90(tmp_path):
    spec = dict(kernels=KERNELS, dtypes=DTYPES, half=sorted(HALF), pointers=POINTERS, floats=sorted(FLOATS),
                tuples=TUPLES)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, do not reuse an earlier run's binaries
    result = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
