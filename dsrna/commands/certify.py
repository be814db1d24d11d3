"""``dsrna certify``: certified radius of every test image for a trained model."""

from __future__ import annotations

import argparse

HELP = "certified radius per test image of a trained model.pt (IBP, CROWN-IBP or CROWN bounds)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.evaluation.certify import METHODS, NORMS
    from dsrna.evaluation.common import add_evaluation_arguments

    add_evaluation_arguments(parser, "certify", NORMS, batch_size=32, outputs="certify_<norm>_<method>.json and its pictures")
    parser.add_argument("--method", default="crown", choices=METHODS,
                        help="bound method (docs/bounds.md); crown and crown-symbolic are the tightest and the costliest")
    parser.add_argument("--eps", help="comma-separated budgets for the certified-accuracy table (default: none)")
    parser.add_argument("--max-eps", type=float, help="upper end of the bisection (default: the larger of 1 and the largest --eps)")
    parser.add_argument("--tol", type=float, help="bisection tolerance (default: the bound engine's)")
    parser.add_argument("--candidates", type=int, help="eps values tested per bound pass (default 1)")


def run(args: argparse.Namespace) -> int:
    from dsrna.bounds.perturbation import warn_if_whole_box
    from dsrna.evaluation.certify import bisection_options, certify, certify_table
    from dsrna.evaluation.common import parse_floats, prepare_evaluation, result_name, write_json
    from dsrna.evaluation.report import plot_certified_curve, plot_radius_histogram
    from dsrna.plots import save_figure

    eps = parse_floats(args.eps, "--eps") if args.eps and args.eps.strip() else []
    bisection_options(args.max_eps, args.tol, args.candidates, eps)  # refused before any work
    if eps:
        warn_if_whole_box(max(eps), args.norm, "--eps")
    device, model, meta, loader, out = prepare_evaluation(args)
    result = certify(model, loader, args.norm, args.method, eps, max_eps=args.max_eps, tol=args.tol,
                     candidates=args.candidates, device=device, progress=args.progress)
    print(certify_table(result), flush=True)  # shown even if writing the files fails
    stem = result_name("certify", args.norm, args.method)
    write_json(result, out / f"{stem}.json")
    save_figure(plot_radius_histogram(result), out / f"{stem}_hist.png")
    save_figure(plot_certified_curve(result), out / f"{stem}_curve.png")
    print(f"results: {out / f'{stem}.json'}")
    return 0
