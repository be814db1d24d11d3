"""``dsrna compare``: DARTS vs DSRNA-CB/-Jacobian/-Combined with one budget, as the paper's table."""

from __future__ import annotations

import argparse

HELP = "search, train, attack and certify DARTS and the three DSRNA variants; write the comparison table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.bounds.engine import METHODS as BOUND_METHODS
    from dsrna.evaluation.compare import METHODS
    from dsrna.evaluation.train import AMP_CHOICES, PRESETS

    parser.add_argument("--dataset", default="mnist-mini", choices=tuple(PRESETS),
                        help="data set; unset training settings come from its preset")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto", help="search backend: auto, reference, triton, native")
    s = parser.add_argument_group("search")
    s.add_argument("--search-epochs", type=int, default=50)
    s.add_argument("--search-layers", type=int, default=8)
    s.add_argument("--search-channels", type=int, default=16)
    s.add_argument("--search-batch-size", type=int, default=64)
    s.add_argument("--search-order", type=int, default=1, choices=(1, 2))
    s.add_argument("--search-max-steps", type=int, help="cap search steps per epoch (quick runs)")
    s.add_argument("--gamma", type=float, default=0.01, help="weight of the robustness term")
    s.add_argument("--robust-eps", type=float, help="eps of the robustness metrics (default: per data set)")
    s.add_argument("--robust-norm", default="linf", choices=("linf", "l2", "l1"))
    s.add_argument("--robust-batch", type=int, help="robustness term on the first M validation images")
    t = parser.add_argument_group("final training (unset: the data set's preset)")
    t.add_argument("--train-epochs", type=int)
    t.add_argument("--train-layers", type=int)
    t.add_argument("--train-channels", type=int)
    t.add_argument("--train-batch-size", type=int)
    t.add_argument("--train-max-steps", type=int, help="cap training steps per epoch (quick runs)")
    t.add_argument("--amp", default="none", choices=AMP_CHOICES)
    e = parser.add_argument_group("evaluation")
    e.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"), help="norm of FGSM and PGD")
    e.add_argument("--eps", default="0.1", help="FGSM/PGD budgets, comma-separated; the table shows the last")
    e.add_argument("--l2-eps", type=float, default=0.5, help="budget of C&W and AutoAttack (l2)")
    e.add_argument("--no-extra-attacks", dest="extra_attacks", action="store_false",
                   help="skip C&W and AutoAttack, which run where torchattacks is installed")
    e.add_argument("--pgd-steps", type=int, default=100)
    e.add_argument("--certify-norm", default="l2", choices=("linf", "l2", "l1"))
    e.add_argument("--certify-method", default="crown", choices=BOUND_METHODS)
    e.add_argument("--certify-max-eps", type=float,
                   help="largest radius the bisection tries (default 1; the table counts the radii that reach it)")
    e.add_argument("--eval-limit", type=int, default=1000, help="test images for accuracy and attacks")
    e.add_argument("--certify-limit", type=int, default=200, help="test images for certified radii")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from dsrna.evaluation.common import parse_floats
    from dsrna.evaluation.compare import CompareConfig, compare, compare_markdown

    values = dict(vars(args))
    values["eps"] = parse_floats(args.eps, "--eps")
    values["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    fields = set(CompareConfig.__dataclass_fields__)
    result = compare(CompareConfig(**{k: v for k, v in values.items() if k in fields}))
    print(compare_markdown(result))
    print(f"table: {args.out}/compare.md, report: {args.out}/report.html")
    return 0
