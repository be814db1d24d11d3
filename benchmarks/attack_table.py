"""The attacks' strength on the tests' MLP (docs/evaluation.md): robust accuracy under PGD-20, C&W
and AutoAttack at the documented budgets, each attack's wall time, and the C&W settings the wrapper
changes (learning rate 0.1 against torchattacks' 0.01; a log-softmax model, whose logits are all
negative).

    PYTHONPATH=. python benchmarks/attack_table.py [--images 256]

The MLP is the one the tests fit (``fit_mnist_mlp`` in tests/conftest.py: 784-64-10, 150 Adam steps on
512 mnist-mini images, one CPU thread); needs the attack extra (torchattacks, scipy).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from tests.conftest import fit_mnist_mlp  # first: it sets up Triton's mode before dsrna imports triton

from dsrna.attacks import autoattack, carlini_wagner, pgd  # noqa: E402

SETTINGS = [("linf", 0.05), ("linf", 0.1), ("l2", 0.5), ("l2", 1.0), ("l2", 1.5)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def timed(attack, *args, **kwargs) -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)
    start = time.perf_counter()
    x_adv = attack(*args, **kwargs)
    return x_adv, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    model, x, y = fit_mnist_mlp(hidden=64, n_test=args.images)
    print(f"MLP 784-64-10, first {args.images} mnist-mini test images, clean accuracy {accuracy(model, x, y):.2f}%, "
          f"{torch.get_num_threads()} thread(s); robust accuracy in %, wall seconds in brackets\n")
    print("| norm | eps | PGD-20 | C&W | AutoAttack |")
    print("|---|---|---|---|---|")
    for norm, eps in SETTINGS:
        cells = []
        for name, attack, kwargs in (("pgd", pgd, dict(norm=norm, steps=20)), ("cw", carlini_wagner, {}),
                                     ("autoattack", autoattack, dict(norm=norm))):
            if name == "cw" and norm != "l2":
                cells.append("")
                continue
            x_adv, seconds = timed(attack, model, x, y, eps, **kwargs)
            cells.append(f"{accuracy(model, x_adv, y):.2f} ({seconds:.1f} s)")
        print(f"| {norm} | {eps} | " + " | ".join(cells) + " |")

    print("\nC&W's settings at l_2 eps 1.0 (same images):\n")
    print("| C&W | robust accuracy % |")
    print("|---|---|")
    shifted = nn.Sequential(model, nn.LogSoftmax(dim=1))
    for label, net, lr in (("the wrapper (lr 0.1)", model, 0.1), ("torchattacks' lr 0.01", model, 0.01),
                           ("the wrapper on a log-softmax output", shifted, 0.1)):
        x_adv, _ = timed(carlini_wagner, net, x, y, 1.0, lr=lr)
        print(f"| {label} | {accuracy(model, x_adv, y):.2f} |")


if __name__ == "__main__":
    main()
