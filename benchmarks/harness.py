"""The benchmark harness: every backend against the reference, in one process per device.

For each (configuration, metric) in priority order and each backend side by side, the harness
builds the step (:mod:`benchmarks.workloads`), warms it up, times it (CUDA events on a GPU,
``perf_counter`` on the CPU), records the median with the 20th and 80th percentiles, images/s, the
peak memory of the timed steps and, on a GPU, the kernels one step launches (torch.profiler). Each
row is appended to ``bench.jsonl`` as soon as it is measured, so a run cut short keeps what it did.

Nothing stops the run: a backend that cannot run here, a part of the library that has not landed or
a time budget already spent gives ``status: "skipped: <reason>"``; an exception, or a row over its
hard time limit, gives ``status: "error: <one line>"``. The one exception is an error that leaves
the CUDA context unusable (an illegal memory access, say): every later row would fail with it, so the
run stops with exit status :data:`EXIT_CONTEXT_LOST`; rerun with ``--resume`` to carry on in a fresh
process without the backend that broke it.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import platform
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

import dsrna
from dsrna.backend import BACKENDS, backend_status, use_backend
from dsrna.search.cuda_graph import CudaGraph, run_on_side_stream

from benchmarks.workloads import GRAPHABLE, IMAGENET_ONLY, METRICS, ROBUST_SEARCH, SMALL_ONLY, Shape, Unavailable, build

EXIT_CONTEXT_LOST = 3
CONTEXT_LOST = "CUDA context lost"
GRAPH_SUFFIX = "+graph"
# The metrics a GPU run measures first, at the first batch size: what a search spends its time on.
CORE = ("forward", "train", "search-1st", "jacobian")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROWS_FILE, REPORT_FILE, CHART_FILE = "bench.jsonl", "bench.md", "bench.png"


class RowTimeout(BaseException):
    """Raised by the alarm when a row runs past its hard limit (BaseException: no library code swallows it)."""


@dataclass
class Options:
    device: torch.device
    shapes: list[Shape]  # the main configurations, in priority order
    small: Shape  # where the expensive metrics (full CROWN, certified radius) run
    imagenet: Shape  # where the ImageNet-size search iteration runs
    metrics: tuple[str, ...]
    backends: tuple[str, ...]
    warmup: int
    repeats: int
    row_seconds: float  # timed runs stop after this long (once at least 3 are in)
    row_timeout: float  # hard limit per row, build and warm-up included
    time_budget: float | None  # whole run; rows after it are recorded as skipped
    profile_max_ms: float  # count kernels only for steps faster than this (the profiler slows long steps a lot)
    out: Path
    resume: bool
    seed: int


# --- configuration ---------------------------------------------------------------------------------


def default_backends(device: torch.device) -> tuple[str, ...]:
    """Every backend; on a GPU also the reference and ``auto`` replayed as CUDA graphs.

    Triton on the CPU only runs under its (very slow) interpreter: ask for it explicitly."""
    if device.type == "cuda":
        return ("reference", "reference" + GRAPH_SUFFIX, "native", "triton", "auto", "auto" + GRAPH_SUFFIX)
    return ("reference", "native", "auto")


def split_backend(name: str) -> tuple[str, bool]:
    """``"auto+graph"`` -> ``("auto", True)``."""
    graph = name.endswith(GRAPH_SUFFIX)
    return (name[: -len(GRAPH_SUFFIX)] if graph else name), graph


def check_backend_names(names) -> tuple[str, ...]:
    for name in names:
        base, _ = split_backend(name)
        if base not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(('auto',) + BACKENDS)}, each optionally with {GRAPH_SUFFIX}")
    return tuple(names)


def check_metric_names(names) -> tuple[str, ...]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    return tuple(m for m in METRICS if m in names)  # the tables' order


def main_shapes(batches, quick: bool, image: int | None, C: int | None, layers: int | None) -> list[Shape]:
    """BASELINE.md's model (C=16, 8 cells, 32x32, 3 channels, 10 classes) or, with ``quick``, a tiny one."""
    prefix, default = ("quick-", (16, 4, 3)) if quick else ("", (32, 16, 8))
    image, C, layers = image or default[0], C or default[1], layers or default[2]
    return [Shape(f"{prefix}b{b}", b, image, C, layers) for b in batches]


SMALL = Shape("small-b2", batch=2, image=8, C=4, layers=3)
# PC-DARTS' ImageNet search: batch 1024 over 8 GPUs, i.e. 128 per GPU, C=16, 8 cells.
IMAGENET = Shape("imagenet-b128", batch=128, image=224, C=16, layers=8, num_classes=1000)
IMAGENET_QUICK = Shape("quick-imagenet-b2", batch=2, image=64, C=4, layers=3, num_classes=1000)


def plan(shapes: list[Shape], small: Shape, metrics: tuple[str, ...], imagenet: Shape) -> list[tuple[Shape, str]]:
    """(configuration, metric) pairs, most important first, so that a run cut short by its time
    budget has measured what matters: the core metrics at the first batch size, the rest at that
    size, the other sizes, full CROWN and the radius on the small shape, the ImageNet-size search
    iteration, the Jacobian step at the larger sizes (about 20 s a step for the reference at batch 256
    on an H200), and last the DSRNA search iterations at the first size."""
    first, others = shapes[:1], shapes[1:]
    everywhere = [m for m in METRICS if m not in SMALL_ONLY | IMAGENET_ONLY | ROBUST_SEARCH]
    order = [(s, m) for s in first for m in CORE]
    order += [(s, m) for s in first for m in everywhere if m not in CORE]
    order += [(s, m) for s in others for m in everywhere if m != "jacobian"]
    order += [(small, m) for m in METRICS if m in SMALL_ONLY]
    order += [(imagenet, m) for m in METRICS if m in IMAGENET_ONLY]
    order += [(s, "jacobian") for s in others]
    order += [(s, m) for s in first for m in METRICS if m in ROBUST_SEARCH]
    return [(s, m) for s, m in order if m in metrics]


# --- environment -----------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What every row carries: the device and the versions that produced it."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        name, capability = _cpu_name(), None
    return {
        "device": name, "device_type": device.type, "capability": capability, "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _version("triton"), "dsrna": dsrna.__version__, "git": _git_commit(),
    }


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def default_out(device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return RESULTS_DIR / f"{datetime.date.today().isoformat()}_{device_slug(name)}"


# --- timing ----------------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def _time_once(step: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one step. On a GPU the events span the step's queued work; the queue is empty
    at the start (synchronised after the previous step), so host overhead counts as it should."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_step(step: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              row_seconds: float, reset_peak: bool = True) -> list[float]:
    """Warm up (at least once: compilation, autotuning and allocation stay out of the numbers), then
    time up to ``repeats`` steps, stopping early once ``row_seconds`` are spent and 3 samples are in
    (or 1, when one step takes over half of ``row_seconds``: the row's ``n`` says so). The peak
    memory counter starts after the warm-up unless ``reset_peak`` is False."""
    spent = 0.0
    for i in range(max(1, warmup)):
        spent += _time_once(step, device) / 1e3
        if spent > row_seconds / 3:
            break
    if device.type == "cuda" and reset_peak:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    samples, spent = [], 0.0
    while len(samples) < repeats:
        samples.append(_time_once(step, device))
        spent += samples[-1] / 1e3
        if spent > row_seconds and (len(samples) >= 3 or samples[0] / 1e3 > row_seconds / 2):
            break
    return samples


def median_us(step: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median microseconds of ``repeats`` timed steps after ``warmup`` (:func:`time_step` without
    its time box), for the op-level micro-benchmarks."""
    return 1e3 * float(np.median(time_step(step, device, warmup, repeats, row_seconds=float("inf"))))


class CudaGraphStep:
    """A step captured once as a CUDA graph (:class:`dsrna.search.cuda_graph.CudaGraph`) after
    ``warmup`` eager steps on a side stream, then replayed: the same kernels with no host overhead.
    The step's tensors stay alive with this object, since the graph reads and writes their memory."""

    def __init__(self, step: Callable[[], object], warmup: int = 3):
        for _ in range(warmup):
            run_on_side_stream(step)
        self.graph = CudaGraph(step)

    def __call__(self) -> None:
        self.graph.replay()


def count_kernels(step: Callable[[], object], device: torch.device) -> int | None:
    """GPU kernels one step runs, from the profiler (for a CUDA graph, the kernels its one launch
    replays); None when the profiler fails or sees nothing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # GPU activity alone is the cheapest to record; some profiler builds only report kernels that
    # have a CPU-side launch event, so ask again with both if the first attempt sees nothing.
    for activities in ([ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]):
        try:
            with profile(activities=activities) as prof:
                step()
                torch.cuda.synchronize(device)
            n = sum(1 for e in prof.events()
                    if e.device_type == DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset")))
        except Exception:  # noqa: BLE001  (the count is optional; the timing stands without it)
            return None
        if n:
            return n
    return None


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`RowTimeout` in this (main) thread after ``seconds``; a no-op in other threads."""
    def ring(signum, frame):
        raise RowTimeout()

    try:
        previous = signal.signal(signal.SIGALRM, ring)
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def cuda_context_ok(device: torch.device) -> bool:
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


# --- one row ---------------------------------------------------------------------------------------


def measure(shape: Shape, metric: str, backend: str, options: Options, hard_limit: float,
            budget_cut: bool = False) -> dict:
    """The measured fields of one row (status, timings, memory, kernels). ``hard_limit`` stops the
    row; ``budget_cut`` says it is what was left of the run's time budget, so a row stopped by it is
    skipped (``--resume`` measures it again), not failed."""
    device = options.device
    base, graph = split_backend(backend)
    if graph and device.type != "cuda":
        return {"status": "skipped: CUDA graphs need a CUDA device"}
    ok, why = backend_status(base, device.type) if base != "auto" else (True, "")
    if not ok:
        return {"status": f"skipped: {why}"}
    torch.manual_seed(options.seed)  # the same weights and inputs for every backend
    step = None
    try:
        with _alarm(hard_limit), use_backend(base):
            if graph:
                # A replay allocates nothing: the graph's memory is what its capture (and the eager
                # warm-up before it) took, so the peak counts from before the set-up.
                torch.cuda.reset_peak_memory_stats(device)
            step = build(metric, shape, base, device)
            if graph:
                step = CudaGraphStep(step)
            samples = time_step(step, device, options.warmup, options.repeats, options.row_seconds, reset_peak=not graph)
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            median = percentile(samples, 50)
            launches = None
            if device.type == "cuda" and median <= options.profile_max_ms:
                launches = count_kernels(step, device)
    except Unavailable as exc:
        return {"status": f"skipped: {exc}"}
    except RowTimeout:
        if budget_cut:
            return {"status": f"skipped: time budget of {options.time_budget:.3g} s spent (stopped after {hard_limit:.3g} s)"}
        return {"status": f"error: timed out after {hard_limit:.3g} s"}
    except Exception as exc:  # noqa: BLE001  (recorded in the row; the run goes on)
        status = f"error: {_one_line(exc)}"
        if device.type == "cuda" and not cuda_context_ok(device):
            status += f" [{CONTEXT_LOST}]"
        return {"status": status}
    finally:
        del step
    return {
        "status": "ok", "n": len(samples), "median_ms": median,
        "p20_ms": percentile(samples, 20), "p80_ms": percentile(samples, 80),
        "images_per_s": shape.batch * 1e3 / median, "ms_per_image": median / shape.batch,
        "peak_mem_bytes": peak, "peak_mem_gb": None if peak is None else peak / 1e9,
        "launches": launches,
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(row: dict) -> str:
    """One progress line."""
    head = f"{row['config']:>10} {row['metric']:<10} {row['backend']:<16}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    extra = f", {row['peak_mem_gb']:.2f} GB" if row.get("peak_mem_gb") is not None else ""
    extra += f", {row['launches']} kernels" if row.get("launches") else ""
    return (f"{head} {row['median_ms']:10.2f} ms (p20 {row['p20_ms']:.2f}, p80 {row['p80_ms']:.2f}, n={row['n']}), "
            f"{row['images_per_s']:.1f} img/s{extra}")


# --- the run ---------------------------------------------------------------------------------------


def row_key(row: dict) -> tuple[str, str, str]:
    return row["config"], row["metric"], row["backend"]


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``bench.jsonl``, the last one of each (config, metric, backend) winning (a
    resumed run re-measures rows skipped for time). A truncated last line is ignored."""
    rows: dict[tuple, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.pop(row_key(row), None)
            rows[row_key(row)] = row
    return list(rows.values())


def run(options: Options) -> int:
    """Measure every planned row; return 0, or :data:`EXIT_CONTEXT_LOST` when the CUDA context broke."""
    rows_path = options.out / ROWS_FILE
    if not options.resume and read_rows(rows_path):  # measured rows are never dropped unasked
        raise FileExistsError(f"{options.out} already holds benchmark rows: pass --resume to measure only the "
                              "missing ones, or choose another --out")
    options.out.mkdir(parents=True, exist_ok=True)
    done, broken = set(), set()
    if options.resume:
        for row in read_rows(rows_path):
            if not row["status"].startswith("skipped"):
                done.add(row_key(row))
            if CONTEXT_LOST in row["status"]:
                broken.add(row["backend"])
    else:
        rows_path.write_text("")
    env = environment(options.device)
    print(f"dsrna bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}) -> {options.out}", flush=True)
    start = time.monotonic()
    with rows_path.open("a") as sink:
        for shape, metric in plan(options.shapes, options.small, options.metrics, options.imagenet):
            for backend in options.backends:
                if split_backend(backend)[1] and metric not in GRAPHABLE:
                    continue
                key = (shape.name, metric, backend)
                if key in done:
                    continue
                left = None if options.time_budget is None else options.time_budget - (time.monotonic() - start)
                t0 = time.monotonic()
                if backend in broken:
                    fields = {"status": f"skipped: {backend} broke the CUDA context in an earlier row"}
                elif left is not None and left <= 0:
                    fields = {"status": f"skipped: time budget of {options.time_budget:.3g} s spent"}
                else:
                    budget_cut = left is not None and left < options.row_timeout
                    fields = measure(shape, metric, backend, options,
                                     left if budget_cut else options.row_timeout, budget_cut)
                    _release(options.device)
                row = {**env, "config": shape.name, **{k: v for k, v in shape.as_dict().items() if k != "name"},
                       "metric": metric, "backend": backend, **fields,
                       "seconds": round(time.monotonic() - t0, 3),
                       "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                print(describe(row), flush=True)
                if CONTEXT_LOST in row["status"]:
                    print(f"dsrna bench: the CUDA context is unusable after {backend}; rerun with --resume "
                          f"to go on without it", flush=True)
                    return EXIT_CONTEXT_LOST
    return 0
