"""``dsrna attack``: robust accuracy of a trained model under attacks, over a list of budgets."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "robust accuracy of a trained model.pt under FGSM/PGD (and C&W/AutoAttack with the extra)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.attacks import ATTACKS, NORMS

    parser.add_argument("model", help="model.pt written by dsrna train")
    parser.add_argument("--norm", default="linf", choices=NORMS)
    parser.add_argument("--eps", required=True, help="comma-separated budgets in pixel units, e.g. 0.05,0.1,0.2")
    parser.add_argument("--attacks", default="fgsm,pgd", help=f"comma-separated, from {','.join(ATTACKS)} (cw: l2 only; autoattack: linf or l2; "
                        "both need the extra: pip install 'dsrna[attacks]')")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps (the paper reports 100)")
    parser.add_argument("--restarts", type=int, default=1, help="PGD random restarts")
    parser.add_argument("--dataset", help="default: the data set the model was trained on")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--limit", type=int, help="attack the first N test images only")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="folder for attack.json/attack.png (default: the model's folder)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from dsrna.attacks import ATTACKS
    from dsrna.evaluation.attack import attack_table, check_attack_norm, evaluate_attacks
    from dsrna.evaluation.common import evaluation_loader, parse_floats, pick_device, write_json
    from dsrna.evaluation.report import plot_attack_curve
    from dsrna.plots import save_figure
    from dsrna.evaluation.train import load_model

    eps = parse_floats(args.eps, "--eps")
    attacks = list(dict.fromkeys(a.strip() for a in args.attacks.split(",") if a.strip()))
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"--attacks: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ATTACKS)}")
    # A norm the attack does not support, or a missing extra, fails before any work.
    check_attack_norm(attacks, args.norm)
    device = pick_device(args.device)
    model, meta = load_model(args.model, device)
    loader = evaluation_loader(args.dataset or meta["dataset"], args.data_root, args.limit, args.batch_size)
    result = evaluate_attacks(model, loader, eps, attacks, args.norm, steps=args.steps, restarts=args.restarts,
                              num_classes=meta["model_config"]["num_classes"], device=device, progress=args.progress)
    out = Path(args.out) if args.out else Path(args.model).parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(result, out / "attack.json")
    save_figure(plot_attack_curve(result), out / "attack.png")
    print(attack_table(result))
    print(f"results: {out / 'attack.json'}, curve: {out / 'attack.png'}")
    return 0
