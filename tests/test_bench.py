"""The benchmark harness works: rows, markdown and chart from a real CPU --quick run, and every way a
row can end (measured, skipped, failed, timed out, cut by the budget, resumed) without stopping the
run. It checks the harness, never the speed."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsrna.cli import main
from dsrna.commands.bench import _load_harness

harness, report = _load_harness()
from benchmarks import workloads  # noqa: E402  (importable once _load_harness put the checkout on the path)

ROOT = Path(__file__).resolve().parent.parent
TINY = workloads.Shape("tiny-b2", batch=2, image=8, C=4, layers=3)


def options(out, metrics, backends=("reference",), **overrides):
    values = dict(device=torch.device("cpu"), shapes=[TINY], small=TINY, imagenet=TINY, metrics=metrics, backends=backends,
                  warmup=1, repeats=2, row_seconds=5.0, row_timeout=30.0, time_budget=None, profile_max_ms=0.0,
                  out=out, resume=False, seed=0)
    values.update(overrides)
    return harness.Options(**values)


def rows_of(out):
    return {(r["metric"], r["backend"]): r for r in harness.read_rows(out / harness.ROWS_FILE)}


def cheap(shape, backend, device):
    x = torch.rand(shape.batch, 3, device=device)
    return lambda: x.sum()


def test_quick_cpu_run_through_the_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--threads", "1", "--only", "forward,train",
         "--backends", "reference,auto", "--batch", "2", "--image-size", "8", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = rows_of(tmp_path)
    assert set(rows) == {(m, b) for m in ("forward", "train") for b in ("reference", "auto")}
    for row in rows.values():
        assert row["status"] == "ok", row["status"]
        assert row["device_type"] == "cpu" and row["torch"] == torch.__version__ and row["cpu_threads"] == 1
        assert (row["config"], row["batch"], row["image"], row["C"], row["layers"]) == ("quick-b2", 2, 8, 4, 3)
        assert row["n"] == 2 and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["images_per_s"] == pytest.approx(2e3 / row["median_ms"])
        assert row["peak_mem_bytes"] is None and row["launches"] is None  # GPU-only fields
    text = (tmp_path / harness.REPORT_FILE).read_text()
    assert "## Median ms (speedup over the reference)" in text and "| quick-b2 | train |" in text
    assert "x) |" in text  # auto's speedup over the reference
    assert (tmp_path / harness.CHART_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| quick-b2 | forward |" in done.stdout  # the short table is printed last


def test_every_row_outcome_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def broken(shape, backend, device):
        raise RuntimeError("boom\nsecond line")

    def missing(shape, backend, device):
        raise workloads.Unavailable("dsrna.somewhere not available")

    def slow(shape, backend, device):
        return lambda: time.sleep(5)

    for metric, builder in (("forward", cheap), ("train", broken), ("ibp", missing), ("crown-ibp", slow)):
        monkeypatch.setitem(workloads.BUILDERS, metric, builder)
    opts = options(tmp_path, ("forward", "train", "ibp", "crown-ibp"),
                   backends=("reference", "reference+graph", "native"), row_timeout=0.5)
    monkeypatch.setattr(harness, "backend_status", lambda name, device: (name == "reference", f"{name} not built"))
    assert harness.run(opts) == 0
    rows = rows_of(tmp_path)
    assert rows["forward", "reference"]["status"] == "ok"
    assert rows["forward", "reference+graph"]["status"] == "skipped: CUDA graphs need a CUDA device"
    assert rows["forward", "native"]["status"] == "skipped: native not built"
    assert ("ibp", "reference+graph") not in rows  # graph variants only where graphable
    assert rows["train", "reference"]["status"] == "error: RuntimeError: boom"
    assert rows["ibp", "reference"]["status"] == "skipped: dsrna.somewhere not available"
    assert rows["crown-ibp", "reference"]["status"] == "error: timed out after 0.5 s"
    assert rows["crown-ibp", "reference"]["seconds"] < 4


def test_time_budget_then_resume_measures_only_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(workloads.BUILDERS, "forward", lambda *args: lambda: time.sleep(5))
    monkeypatch.setitem(workloads.BUILDERS, "ibp", cheap)
    assert harness.run(options(tmp_path, ("forward", "ibp"), time_budget=0.5)) == 0
    rows = rows_of(tmp_path)
    assert rows["forward", "reference"]["status"].startswith("skipped: time budget of 0.5 s spent (stopped after 0.")
    assert rows["ibp", "reference"]["status"] == "skipped: time budget of 0.5 s spent"
    monkeypatch.setitem(workloads.BUILDERS, "forward", cheap)
    assert harness.run(options(tmp_path, ("forward", "ibp"), resume=True)) == 0
    assert {k: r["status"] for k, r in rows_of(tmp_path).items()} == {("forward", "reference"): "ok", ("ibp", "reference"): "ok"}
    first = rows_of(tmp_path)
    assert harness.run(options(tmp_path, ("forward", "ibp"), resume=True)) == 0  # nothing left to do
    assert rows_of(tmp_path) == first
    # without --resume the rows are not dropped
    with pytest.raises(FileExistsError, match="already holds benchmark rows: pass --resume"):
        harness.run(options(tmp_path, ("forward",)))
    assert rows_of(tmp_path) == first


def test_a_lost_cuda_context_stops_the_run_and_resume_goes_on_without_that_backend(tmp_path, monkeypatch):
    def measure(shape, metric, backend, opts, hard_limit, budget_cut):
        if backend == "triton":
            return {"status": f"error: AcceleratorError: illegal memory access [{harness.CONTEXT_LOST}]"}
        return {"status": "ok", "n": 1, "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "images_per_s": 2e3}

    monkeypatch.setattr(harness, "measure", measure)
    opts = options(tmp_path, ("forward", "train"), backends=("reference", "triton", "auto"))
    assert harness.run(opts) == harness.EXIT_CONTEXT_LOST
    assert set(rows_of(tmp_path)) == {("forward", "reference"), ("forward", "triton")}
    opts.resume = True
    assert harness.run(opts) == 0
    rows = rows_of(tmp_path)
    assert harness.CONTEXT_LOST in rows["forward", "triton"]["status"]
    assert rows["train", "triton"]["status"].startswith("skipped: triton broke the CUDA context")
    assert rows["forward", "auto"]["status"] == rows["train", "auto"]["status"] == "ok"


def test_plan_puts_the_core_rows_first_and_the_expensive_ones_last():
    shapes = harness.main_shapes((64, 256), quick=False, image=None, C=None, layers=None)
    assert [(s.batch, s.image, s.C, s.layers) for s in shapes] == [(64, 32, 16, 8), (256, 32, 16, 8)]
    order = [(s.name, m) for s, m in harness.plan(shapes, harness.SMALL, workloads.METRICS, harness.IMAGENET)]
    assert order[:4] == [("b64", m) for m in harness.CORE]
    assert order[-8:] == [(harness.SMALL.name, "crown-symbolic"), (harness.SMALL.name, "crown"),
                          (harness.SMALL.name, "radius"), (harness.IMAGENET.name, "search-imagenet"), ("b256", "jacobian"),
                          ("b64", "search-jacobian"), ("b64", "search-cb"), ("b64", "search-cb-symbolic")]
    assert ("b64", "crown") not in order and ("b64", "search-imagenet") not in order
    assert ("b256", "search-cb") not in order and ("b256", "search-cb-symbolic") not in order
    assert order.index(("b64", "ibp")) < order.index(("b256", "forward"))
    own_shape = len(workloads.SMALL_ONLY) + len(workloads.IMAGENET_ONLY) + len(workloads.ROBUST_SEARCH)
    assert len(order) == len(set(order)) == 2 * (len(workloads.METRICS) - own_shape) + own_shape


def gpu_row(metric, batch, backend, ms, **extra):
    return {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "torch": "2.11.0", "cuda": "13.0",
            "triton": "3.6.0", "python": "3.12.3", "dsrna": "0.1.0", "git": None, "cpu_threads": 16,
            "config": f"b{batch}", "batch": batch, "image": 32, "C": 16, "layers": 8, "in_channels": 3,
            "num_classes": 10, "metric": metric, "backend": backend, "status": "ok", "n": 10, "median_ms": ms,
            "p20_ms": ms, "p80_ms": ms, "images_per_s": batch * 1e3 / ms, "peak_mem_gb": 7.0, "launches": 20000,
            **extra}


def test_report_speedups_and_the_baseline_comparison(tmp_path):
    rows = [gpu_row("train", 64, "reference", 260.0), gpu_row("train", 64, "triton", 65.0),
            gpu_row("train", 64, "reference+graph", 130.0),
            gpu_row("jacobian", 64, "reference", 20000.0), gpu_row("jacobian", 64, "native", 1.0, status="error: x")]
    (tmp_path / harness.ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"truncated')
    text = report.render(tmp_path, compare_baseline=True)
    assert "| b64 | train | 260 | 130 (2.00x) |  | 65.0 (4.00x) |" in text  # reference, +graph, native, triton
    assert "| b64 | jacobian | 20000 |  | error |  |" in text
    assert "| train | 64 | reference | 257 | 260 | 1.01 | 7.60 | 7.00 | near |" in text
    assert "| train | 64 | reference+graph | 132 | 130 | 0.98 |  | 7.00 | near |" in text
    assert "| jacobian | 64 | reference | 6275 | 20000 | 3.19 |" in text and "CHECK" in text
    assert "Different cards" in text  # the baseline is an H200, these rows an H100
    assert "## Reference against BASELINE.md" in (tmp_path / harness.REPORT_FILE).read_text()
    assert (tmp_path / harness.CHART_FILE).is_file()


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["bench", "--only", "forward,nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--backends", "cudnn", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--report-only", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "unknown metric 'nope'" in err[0] and "unknown backend 'cudnn'" in err[1]
    assert "no bench.jsonl" in err[2]
    with pytest.raises(SystemExit):
        main(["bench", "--batch", "0"])
    with pytest.raises(SystemExit):  # the search rows need a normal cell
        main(["bench", "--layers", "2"])
    assert "--layers: expected a number >= 3, got '2'" in capsys.readouterr().err


@pytest.mark.parametrize("metric", workloads.METRICS)
def test_every_workload_runs_a_step_on_a_tiny_shape(metric):
    """Each metric's set-up and step work end to end (on the reference, and on a fast backend where
    one runs here), so that a GPU run never finds a broken row first."""
    from dsrna.backend import backend_status, use_backend

    shape = workloads.Shape("tiny-imagenet", batch=2, image=32, C=4, layers=3) if metric == "search-imagenet" else TINY
    backends = ["reference"] + [b for b in ("native", "triton") if backend_status(b, "cpu")[0]][:1]
    for name in backends[:1] if metric in workloads.SMALL_ONLY else backends:  # seconds per pass
        torch.manual_seed(0)
        with use_backend(name):
            workloads.build(metric, shape, name, torch.device("cpu"))()


@pytest.mark.skipif(os.environ.get("DSRNA_NO_EXT") == "1", reason="compares against the native extension")
def test_depthwise_micro_benchmark_runs_on_a_cpu():
    """The depthwise table gpu_check.sh runs on the GPU (``--device cuda``), here on a CPU at batch 1."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "benchmarks.depthwise_micro", "--batch", "1", "--repeats", "1",
                           "--threads", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    totals = [line for line in done.stdout.splitlines() if line.startswith("| all |")]
    assert len(totals) == 2 and all("x) |" in line for line in totals)  # per-conv ops, then the stacked first stage


def test_loader_throughput_reads_synthetic_imagenet_through_the_real_pipeline(tmp_path):
    """The loader table of gpu_check.sh: synthetic JPEGs in the ImageNet layout go through dsrna's own
    ImageNet pipeline and loader; every worker count gives a row with a positive rate."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows_file = tmp_path / "loader.jsonl"
    done = subprocess.run([sys.executable, "benchmarks/loader_throughput.py", "--synthetic", "12", "--workers", "0,1",
                           "--batch", "4", "--batches", "2", "--jsonl", str(rows_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["workers"], r["images"]) for r in rows] == [(0, 8), (1, 8)]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "| 1 | 4 |" in done.stdout


def test_percentiles_of_fixed_samples_reach_the_row_and_the_all_rows_table(tmp_path, monkeypatch):
    """The p20/p80 fields are the 20th/80th percentiles of the timed samples (not their min/max), the
    warm-up step stays out of them, and the All rows table shows p20 before p80."""
    times = iter([999.0, 50.0, 10.0, 40.0, 20.0, 30.0])  # one warm-up step, then five timed ones (ms)
    monkeypatch.setattr(harness, "_time_once", lambda step, device: next(times))
    monkeypatch.setitem(workloads.BUILDERS, "forward", cheap)
    assert harness.run(options(tmp_path, ("forward",), warmup=1, repeats=5)) == 0
    row = rows_of(tmp_path)["forward", "reference"]
    # numpy's linear interpolation over the sorted 10, 20, 30, 40, 50: rank 0.2 * 4 = 0.8 -> 18, 3.2 -> 42
    assert (row["n"], row["median_ms"], row["p20_ms"], row["p80_ms"]) == (5, 30.0, pytest.approx(18.0), pytest.approx(42.0))
    report.render(tmp_path)
    text = (tmp_path / harness.REPORT_FILE).read_text()
    all_rows = text.split("## All rows", 1)[1]
    assert "| p20 ms | p80 ms |" in all_rows
    assert "| tiny-b2 | forward | reference | ok | 30.000 | 18.000 | 42.000 | 5 | 66.7 |  |  |" in all_rows


def test_peak_memory_restarts_after_the_warm_up_and_before_a_graph_capture_only(tmp_path, monkeypatch):
    """On a GPU each row's peak memory counter is reset once: after the eager warm-up (so the warm-up's
    allocations stay out), or for a +graph row before the set-up and capture (a replay allocates
    nothing; a reset after the capture would report almost nothing). Runs the harness logic on the
    CPU with the CUDA calls replaced."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: events.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12345)
    monkeypatch.setattr(harness, "_time_once", lambda step, device: (step(), 1.0)[1])
    monkeypatch.setattr(harness, "backend_status", lambda name, device: (True, ""))
    monkeypatch.setattr(harness, "CudaGraphStep", lambda step: events.append("capture") or step)

    def build(metric, shape, backend, device):
        events.append("build")
        return lambda: events.append("step")

    monkeypatch.setattr(harness, "build", build)
    opts = options(tmp_path, ("forward",), device=torch.device("cuda"), warmup=2, repeats=3)
    expected = {"reference": ["build", "step", "step", "reset", "step", "step", "step"],
                "reference+graph": ["reset", "build", "capture"] + ["step"] * 5}
    for backend, sequence in expected.items():  # two rows: the counter restarts for each
        events.clear()
        fields = harness.measure(TINY, "forward", backend, opts, hard_limit=30.0)
        assert fields["status"] == "ok", fields["status"]
        assert fields["peak_mem_bytes"] == 12345 and fields["n"] == 3
        assert events == sequence


def test_cpu_rows_are_never_compared_with_the_h200_baseline(tmp_path):
    """The baseline comparison takes GPU rows only: a CPU row with the baseline's model, metric and
    batch is not a line of it (a CPU run's report has no comparison at all)."""
    cpu = dict(device="AMD EPYC", device_type="cpu", peak_mem_gb=None, launches=None)
    rows = [gpu_row("train", 64, "reference", 260.0), gpu_row("forward", 64, "reference", 5000.0, **cpu)]
    text = report.baseline_comparison(rows, report.load_baseline())
    assert "| train | 64 | reference | 257 | 260 |" in text
    assert "| forward | 64 |" not in text and "AMD EPYC" not in text
    (tmp_path / harness.ROWS_FILE).write_text(json.dumps(rows[1]) + "\n")
    assert report.baseline_comparison(rows[1:], report.load_baseline()) is None
    assert report.render(tmp_path, compare_baseline=True).startswith("No reference row matches BASELINE.md's model")
    assert "## Reference against BASELINE.md" not in (tmp_path / harness.REPORT_FILE).read_text()


def test_chart_bars_grow_up_for_a_speedup_and_down_for_a_slowdown(tmp_path, monkeypatch):
    """Each bar spans from 1x to the backend's speedup over the reference: 2x faster reaches 2, 2x
    slower reaches 0.5 (not the inverse)."""
    import matplotlib.axes

    bars, original = {}, matplotlib.axes.Axes.bar

    def bar(self, *args, **kwargs):
        container = original(self, *args, **kwargs)
        bars[kwargs["label"]] = [(p.get_y(), p.get_y() + p.get_height()) for p in container.patches]
        return container

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    rows = [gpu_row("train", 64, "reference", 100.0), gpu_row("train", 64, "native", 50.0),
            gpu_row("train", 64, "triton", 200.0), gpu_row("forward", 64, "reference", 10.0),
            gpu_row("forward", 64, "native", 2.5), gpu_row("forward", 64, "triton", 10.0)]
    report.chart(rows, tmp_path / harness.CHART_FILE)
    assert set(bars) == {"native", "triton"}
    assert bars["native"] == [pytest.approx((1.0, 2.0)), pytest.approx((1.0, 4.0))]  # train, forward
    assert bars["triton"] == [pytest.approx((1.0, 0.5)), pytest.approx((1.0, 1.0))]


def test_bench_command_passes_its_options_to_the_harness(tmp_path, monkeypatch):
    """`dsrna bench` builds the harness options from its flags: --quick also shrinks the ImageNet-size
    row, --row-timeout and --time-budget are used, and without them the defaults apply."""
    seen = []
    monkeypatch.setattr(harness, "run", lambda opts: seen.append(opts) or 0)
    monkeypatch.setattr(report, "render", lambda out, compare_baseline=False: "")
    assert main(["bench", "--quick", "--device", "cpu", "--only", "forward", "--backends", "reference",
                 "--row-timeout", "7", "--time-budget", "11", "--out", str(tmp_path)]) == 0
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 0
    quick, full = seen
    assert quick.imagenet == harness.IMAGENET_QUICK and quick.imagenet.image < 224
    assert [(s.batch, s.image, s.C, s.layers) for s in quick.shapes] == [(4, 16, 4, 3)]
    assert (quick.row_timeout, quick.time_budget, quick.warmup, quick.repeats) == (7.0, 11.0, 1, 2)
    assert quick.metrics == ("forward",) and quick.backends == ("reference",) and quick.device.type == "cpu"
    assert full.imagenet == harness.IMAGENET and full.imagenet.image == 224
    assert [(s.batch, s.image, s.C, s.layers) for s in full.shapes] == [(64, 32, 16, 8), (256, 32, 16, 8)]
    assert (full.row_timeout, full.time_budget, full.warmup, full.repeats) == (150.0, None, 3, 10)
