"""``dsrna report``: one self-contained HTML page for a run folder."""

from __future__ import annotations

import argparse

HELP = "write RUN_DIR/report.html (cells, alpha heatmaps, curves, robust and certified accuracy)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a search, train or compare run folder")


def run(args: argparse.Namespace) -> int:
    from dsrna.evaluation.report import write_report

    print(f"report: {write_report(args.run_dir, require_outputs=True)}")
    return 0
