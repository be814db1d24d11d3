"""``dsrna info``: versions, devices, and which backends are built and usable, and why not."""

from __future__ import annotations

import json

HELP = "show versions, devices and which backends (reference, triton, native) can run, and why not"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from dsrna.info import collect, format_report

    data = collect()
    print(json.dumps(data, indent=2) if args.json else format_report(data))
    return 0
