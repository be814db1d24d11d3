"""``dsrna attack``: robust accuracy of a trained model under attacks, over a list of budgets."""

from __future__ import annotations

import argparse

HELP = "robust accuracy of a trained model.pt under FGSM/PGD (and C&W/AutoAttack with the extra)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.attacks import ATTACKS, NORMS
    from dsrna.evaluation.common import add_evaluation_arguments

    add_evaluation_arguments(parser, "attack", NORMS, batch_size=128, outputs="attack_<norm>_<attacks>.json/.png")
    parser.add_argument("--eps", required=True, help="comma-separated budgets in pixel units, e.g. 0.05,0.1,0.2")
    parser.add_argument("--attacks", default="fgsm,pgd", help=f"comma-separated, from {','.join(ATTACKS)} (cw: l2 only; autoattack: linf or l2; "
                        "both need the extra: pip install 'dsrna[attacks]')")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (the paper reports 100)")
    parser.add_argument("--restarts", type=int, default=1, help="PGD random restarts")


def run(args: argparse.Namespace) -> int:
    from dsrna.attacks import ATTACKS
    from dsrna.bounds.perturbation import warn_if_whole_box
    from dsrna.evaluation.attack import attack_table, check_attack_norm, evaluate_attacks
    from dsrna.evaluation.common import parse_floats, prepare_evaluation, result_name, write_json
    from dsrna.evaluation.report import plot_attack_curve
    from dsrna.plots import save_figure

    eps = parse_floats(args.eps, "--eps")
    warn_if_whole_box(max(eps), args.norm, "--eps")
    attacks = list(dict.fromkeys(a.strip() for a in args.attacks.split(",") if a.strip()))
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"--attacks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ATTACKS)}")
    # A norm the attack does not support, or a missing extra, fails before any work.
    check_attack_norm(attacks, args.norm)
    device, model, meta, loader, out = prepare_evaluation(args)
    result = evaluate_attacks(model, loader, eps, attacks, args.norm, steps=args.steps, restarts=args.restarts,
                              num_classes=meta["model_config"]["num_classes"], device=device, progress=args.progress)
    print(attack_table(result), flush=True)  # shown even if writing the files fails
    stem = result_name("attack", args.norm, attacks)
    write_json(result, out / f"{stem}.json")
    save_figure(plot_attack_curve(result), out / f"{stem}.png")
    print(f"results: {out / f'{stem}.json'}, curve: {out / f'{stem}.png'}")
    return 0
