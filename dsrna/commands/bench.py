"""``dsrna bench``: time every backend against the reference; write rows, a markdown table and a chart.

The harness lives in the repository's ``benchmarks/`` folder (it is development tooling, not part
of the installed package), so this command runs from a source checkout; ``python -m benchmarks``
is the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "time every backend against the reference (forward, train, search, Jacobian, bounds); write rows, table, chart"

QUICK = dict(batches=(4,), repeats=2, warmup=1, row_seconds=10.0, row_timeout=60.0)
FULL = dict(batches=(64, 256), repeats=10, warmup=3, row_seconds=15.0, row_timeout=150.0)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive(kind, least=None):
    """A parser of numbers > 0, and >= ``least`` when given."""
    expected = "a positive number" if least is None else f"a number >= {least}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0 or value < (least or 0):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes for CPU and CI: C=4, 3 cells, batch 4, 16x16, 2 repeats")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="default: cuda when visible, else cpu")
    parser.add_argument("--only", metavar="METRICS", type=_csv,
                        help="comma-separated subset of: forward, train, train-bf16, search-1st, search-2nd, "
                             "search-jacobian, search-cb, search-cb-symbolic, search-imagenet, jacobian, ibp, crown-ibp, "
                             "crown-symbolic, crown, radius (default: all)")
    parser.add_argument("--backends", metavar="LIST", type=_csv,
                        help="comma-separated: reference, native, triton, auto, each optionally +graph (CUDA graph "
                             "replay of the forward, train, search and Jacobian steps); default on a GPU: reference, reference+graph, "
                             "native, triton, auto, auto+graph; on a CPU: reference, native, auto")
    parser.add_argument("--batch", metavar="SIZES", type=_positive_ints,
                        help="comma-separated batch sizes (default 64,256; with --quick 4)")
    parser.add_argument("--image-size", type=_positive(int), help="default 32 (--quick: 16)")
    parser.add_argument("--init-channels", type=_positive(int), help="C, default 16 (--quick: 4)")
    parser.add_argument("--layers", type=_positive(int, least=3),
                        help="cells, at least 3 (a search needs a normal cell), default 8 (--quick: 3)")
    parser.add_argument("--repeats", type=_positive(int), help="timed steps per row (default 10; --quick 2)")
    parser.add_argument("--warmup", type=_positive(int), help="untimed steps first (default 3; --quick 1)")
    parser.add_argument("--row-seconds", type=_positive(float),
                        help="stop timing a row after this long once 3 steps are in, or 1 step over half of it "
                             "(default 15; --quick 10)")
    parser.add_argument("--row-timeout", type=_positive(float),
                        help="hard limit per row, set-up and warm-up included (default 150 s; --quick 60)")
    parser.add_argument("--time-budget", type=_positive(float),
                        help="seconds for the whole run; rows after it are recorded as skipped")
    parser.add_argument("--profile-max-ms", type=_positive(float), default=2500.0,
                        help="count kernels (GPU) only for steps faster than this (default 2500 ms)")
    parser.add_argument("--out", type=Path, help="folder for bench.jsonl, bench.md, bench.png (default: "
                                                 "benchmarks/results/<date>_<device>/ in the source checkout)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out and measure only the missing ones")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite bench.md and bench.png from --out's bench.jsonl")
    parser.add_argument("--compare-baseline", action="store_true",
                        help="print the reference rows next to BASELINE.md's H200 figures")
    parser.add_argument("--threads", type=_positive(int),
                        help="CPU threads for torch (default: torch's choice; 1 is far steadier on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)


def _load_harness():
    """Import ``benchmarks.harness`` and ``benchmarks.report`` from the checkout this package is in."""
    import dsrna
    from dsrna.errors import DsrnaError

    root = Path(dsrna.__file__).resolve().parent.parent
    if not (root / "benchmarks" / "harness.py").is_file():
        raise DsrnaError("dsrna bench runs from a source checkout: no benchmarks/ folder beside the dsrna package")
    sys.path.insert(0, str(root))
    from benchmarks import harness, report

    return harness, report


def run(args: argparse.Namespace) -> int:
    import torch

    from dsrna.errors import DsrnaError

    harness, report = _load_harness()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DsrnaError("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    out = args.out or harness.default_out(device)
    if args.report_only:
        if not (out / harness.ROWS_FILE).is_file():
            raise FileNotFoundError(f"--report-only: no {harness.ROWS_FILE} in {out}")
        print(report.render(out, args.compare_baseline))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = QUICK if args.quick else FULL
    metrics = harness.check_metric_names(args.only) if args.only else harness.METRICS
    backends = harness.check_backend_names(args.backends) if args.backends else harness.default_backends(device)
    options = harness.Options(
        device=device,
        shapes=harness.main_shapes(args.batch or defaults["batches"], args.quick, args.image_size,
                                   args.init_channels, args.layers),
        small=harness.SMALL,
        imagenet=harness.IMAGENET_QUICK if args.quick else harness.IMAGENET,
        metrics=metrics,
        backends=backends,
        warmup=args.warmup or defaults["warmup"],
        repeats=args.repeats or defaults["repeats"],
        row_seconds=args.row_seconds or defaults["row_seconds"],
        row_timeout=args.row_timeout or defaults["row_timeout"],
        time_budget=args.time_budget,
        profile_max_ms=args.profile_max_ms,
        out=out,
        resume=args.resume,
        seed=args.seed,
    )
    status = harness.run(options)
    print()
    print(report.render(out, args.compare_baseline))
    print(f"\nrows, report and chart in {out}")
    return status
