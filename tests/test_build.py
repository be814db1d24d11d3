"""The installation: the native extension loads (unless deliberately skipped), `dsrna info` reports
the backends truthfully, and `import dsrna` survives a missing extension."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsrna import _native, backend
from dsrna.cli import main
from dsrna.info import collect, format_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("DSRNA_NO_EXT") == "1", reason="pure-Python install requested (DSRNA_NO_EXT=1)")
def test_extension_is_built_and_registers_its_ops():
    assert _native.C is not None, _native.LOAD_ERROR
    for op in ("weighted_sum", "batched_dot", "depthwise_conv2d", "depthwise_conv2d_transpose",
               "depthwise_conv2d_weight", "interval_depthwise_conv2d"):
        assert hasattr(torch.ops.dsrna, op)
    assert backend.backend_status("native", "cpu") == (True, "dsrna._C loaded")
    assert isinstance(_native.built_with_cuda(), bool)
    if sys.platform.startswith("linux"):  # setup.py builds with OpenMP there: the CPU kernels use torch's threads
        assert _native.built_with_openmp()


def test_info_reports_backends_truthfully(capsys):
    data = collect()
    assert data["versions"]["torch"] == torch.__version__
    for device in ("cpu", "cuda"):
        for name in backend.BACKENDS:
            usable, reason = backend.backend_status(name, device)
            assert data["backends"][device][name] == {"usable": usable, "reason": reason}
    assert data["backends"]["cpu"]["reference"]["usable"]
    assert data["native_extension"]["loaded"] == (_native.C is not None)
    assert data["ops"]["weighted_sum"][0] == "reference" and "native" in data["ops"]["weighted_sum"]
    for op, picked in data["auto"]["cpu"].items():
        assert picked in data["ops"][op]
    assert ("cuda" in data["auto"]) == torch.cuda.is_available()

    report = format_report(data)
    assert f"torch {torch.__version__}" in report and "backends for cuda tensors:" in report
    assert ("CPU kernels on torch's threads" in report) == _native.built_with_openmp()
    if not torch.cuda.is_available():
        assert "cuda: none visible" in report and "no CUDA device visible" in report

    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["versions"]["dsrna"] == data["versions"]["dsrna"]
    assert main(["info"]) == 0
    assert "backends for cpu tensors:" in capsys.readouterr().out


def test_import_without_extension_warns_once_and_falls_back():
    """A fresh interpreter where dsrna._C cannot be imported (as after DSRNA_NO_EXT=1, or an ABI
    mismatch): import works with one warning, the reference path runs, info says why."""
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["dsrna._C"] = None  # makes `import dsrna._C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, dsrna
            from dsrna import backend
            from dsrna.info import collect
            from dsrna.ops import depthwise_conv2d, weighted_sum
            x = torch.rand(2, 3, 8, 8)
            assert depthwise_conv2d(x, torch.rand(3, 1, 3, 3), 1, 1, 1).shape == x.shape
            assert weighted_sum([x, x], torch.rand(2)).shape == x.shape
            assert backend.resolve("weighted_sum", "cpu") == "reference"
            data = collect()
        messages = [str(w.message) for w in caught if "dsrna._C" in str(w.message)]
        assert len(messages) == 1, messages
        assert not data["native_extension"]["loaded"]
        usable, reason = backend.backend_status("native", "cpu")
        assert not usable and "not importable" in reason, reason
        try:
            backend.resolve("weighted_sum", "cpu", "native")
        except backend.BackendUnavailable as exc:
            assert "dsrna._C" in str(exc)
        else:
            raise AssertionError("an explicit native request must fail")
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_info_auto_column_is_what_resolve_picks():
    """`dsrna info`'s "what auto picks" is backend.resolve's choice per op, not the first backend
    registered for it (the reference, always)."""
    with backend.use_backend("auto"):
        data = collect()
        expected = {op: backend.resolve(op, "cpu", "auto") for op in data["ops"]}
    assert data["auto"]["cpu"] == expected
    if backend.backend_status("native", "cpu")[0]:  # native comes first on a CPU (AUTO_ORDER)
        assert data["auto"]["cpu"]["weighted_sum"] == "native"
    report = format_report(data)
    assert f"auto: cpu -> {expected['weighted_sum']}" in report
    with backend.use_backend("reference"):  # another selection does not change what auto would pick
        assert collect()["auto"] == data["auto"]


@pytest.mark.parametrize("with_cuda", [True, False])
def test_info_says_whether_the_extension_has_cuda_kernels(monkeypatch, with_cuda):
    """The "with/without CUDA kernels" wording follows dsrna._C.built_with_cuda(), both ways."""
    monkeypatch.setattr(_native, "built_with_cuda", lambda: with_cuda)
    data = collect()
    assert data["native_extension"]["built_with_cuda"] is with_cuda
    data["native_extension"].update(loaded=True, error=None)  # the wording is only shown for a loaded extension
    report = format_report(data)
    word, other = ("with", "without") if with_cuda else ("without", "with")
    assert f"dsrna._C: loaded, {word} CUDA kernels" in report
    assert f"dsrna._C: loaded, {other} CUDA kernels" not in report


def test_info_shows_the_selected_backend():
    """`backend selected:` is the backend in effect (use_backend / set_backend), not always auto."""
    with backend.use_backend("reference"):
        data = collect()
    assert data["selected_backend"] == "reference"
    assert "backend selected: reference" in format_report(data)
    previous = backend.get_backend()
    backend.set_backend("reference")
    try:
        assert collect()["selected_backend"] == "reference"
    finally:
        backend.set_backend(previous)
    assert collect()["selected_backend"] == previous
