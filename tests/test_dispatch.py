"""How ``dsrna.backend`` picks an implementation: precedence of the explicit argument, the innermost
``use_backend`` context and the global default; what ``auto`` picks per device; when a backend is
usable at all. A private op with stand-in implementations keeps the checks independent of which
kernels this machine has built."""

import threading
import warnings

import pytest
import torch

from dsrna import backend

OP = "dispatch_test_op"


def reference_impl():
    return "reference"


def native_impl():
    return "native"


def triton_impl():
    return "triton"


@pytest.fixture
def registry(monkeypatch):
    """The library's registry plus OP (reference and native on both devices), restored afterwards;
    native usable, whatever this build has."""
    monkeypatch.setattr(backend, "_registry", dict(backend._registry))
    monkeypatch.setattr(backend, "_native_status", lambda: (True, "stand-in"))
    monkeypatch.setattr(backend, "_warned", set())
    backend.register(OP, "reference", reference_impl)
    backend.register(OP, "native", native_impl)
    return backend._registry


def picked(device="cpu", requested=None):
    return backend.dispatch(OP, device, requested)()


def test_auto_picks_the_first_usable_fast_backend_for_the_device(registry):
    assert backend.get_backend() == "auto"
    assert picked() == "native" and backend.resolve(OP, "cpu") == "native"
    # a library op too: the default settings run the native kernels wherever they are built
    if backend.backend_status("native", "cpu")[0] and "native" in registry["weighted_sum"]:
        assert backend.dispatch("weighted_sum", "cpu") is registry["weighted_sum"]["native"][0]


def test_explicit_argument_beats_the_context_and_auto_defers_to_it(registry):
    with backend.use_backend("reference"):
        assert picked(requested="native") == "native"
        assert picked(requested="auto") == "reference"  # a model's default backend follows the context
        assert backend.resolve(OP, "cpu", "auto") == "reference"
        assert picked() == "reference"
    with backend.use_backend("native"):
        assert picked(requested="reference") == "reference"


def test_the_innermost_context_wins_and_each_exit_restores_the_one_outside(registry):
    with backend.use_backend("native"):
        with backend.use_backend("reference"):
            assert backend.get_backend() == "reference" and picked() == "reference"
        assert backend.get_backend() == "native"
        with pytest.raises(ZeroDivisionError), backend.use_backend("reference"):
            1 / 0
        assert backend.get_backend() == "native"
    assert backend.get_backend() == "auto"


def test_contexts_are_per_thread(registry):
    seen = []
    with backend.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(backend.get_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_set_backend_is_the_default_below_every_context(registry, monkeypatch):
    monkeypatch.setattr(backend, "_global_backend", "auto")
    backend.set_backend("reference")
    assert picked() == "reference"
    with backend.use_backend("native"):
        assert picked() == "native"
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, reference, triton, native"):
        backend.set_backend("cuda")
    assert backend.get_backend() == "reference"


def test_an_implementation_registered_for_other_devices_is_never_picked(registry):
    backend.register(OP, "native", native_impl, devices=("cuda",))
    assert picked() == "reference"  # auto
    assert picked(requested="native") == "reference"  # asked for: the op stays on the reference path


def test_auto_falls_back_with_one_warning_per_cause_and_explicit_requests_raise(registry, monkeypatch):
    monkeypatch.setattr(backend, "_native_status", lambda: (False, "extension missing"))
    with pytest.warns(RuntimeWarning, match=r"native backend unusable \(extension missing\); using a slower path"):
        assert picked() == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert picked() == "reference"
    with pytest.raises(backend.BackendUnavailable, match="backend 'native' unavailable for cpu: extension missing"):
        picked(requested="native")


def test_registration_names_are_checked(registry):
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        backend.register(OP, "cuda", native_impl)
    backend.register("no_reference_op", "native", native_impl)
    with pytest.raises(KeyError, match="no reference implementation"):
        backend.resolve("no_reference_op", "cpu")


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_triton_runs_cpu_tensors_only_under_the_interpreter(registry, monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(backend, "_triton_status", lambda: (True, "triton 9.9"))
    backend.register(OP, "triton", triton_impl)
    usable, why = backend.backend_status("triton", "cpu")
    if interpret == "1":
        assert (usable, why) == (True, "triton 9.9 (interpreter)")
        assert picked(requested="triton") == "triton"
        assert picked() == "native"  # auto never picks the interpreter
    else:
        assert not usable and "TRITON_INTERPRET=1" in why
        with pytest.raises(backend.BackendUnavailable, match="TRITON_INTERPRET=1"):
            picked(requested="triton")
    # on a GPU: Triton first, unless the interpreter is on, which runs Triton on the CPU only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "_native_has_cuda", lambda: True)
    assert backend.backend_status("triton", "cuda") == ((True, "triton 9.9") if interpret == "0" else
                                                        (False, "TRITON_INTERPRET=1 is set: Triton kernels run on the CPU only"))
    if interpret == "0":
        assert picked("cuda") == "triton"
    else:
        with pytest.warns(RuntimeWarning, match="triton backend unusable .TRITON_INTERPRET=1 is set"):
            assert picked("cuda") == "native"


def test_native_on_a_gpu_needs_the_cuda_sources_built(registry, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "_native_has_cuda", lambda: False)
    usable, why = backend.backend_status("native", "cuda")
    assert not usable and "built without CUDA sources" in why
    assert backend.backend_status("native", "cpu") == (True, "stand-in")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.backend_status("native", "cuda") == (False, "no CUDA device visible")
    assert backend.backend_status("reference", "cuda")[0]
