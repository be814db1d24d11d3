"""Robust accuracy over a test set: each attack at each budget, as a table, a curve and JSON."""

from __future__ import annotations

import torch
import torch.nn as nn

from dsrna.attacks import ATTACKS, NORMS, check_pgd_options, logits_of, require_torchattacks, run_attack
from dsrna.evaluation.common import evaluation_pass


def evaluate_attacks(model: nn.Module, loader, eps_list, attacks=("fgsm", "pgd"), norm: str = "linf",
                     steps: int = 20, restarts: int = 1, num_classes: int | None = None, device="cpu",
                     progress: bool = False) -> dict:
    """Robust accuracy of ``model`` under every attack at every eps.

    An example counts as robust when it is classified correctly both clean and under the attack.
    Returns a JSON-ready dict: ``norm``, ``eps``, ``attacks``, ``steps``, ``restarts``, ``n``,
    ``clean_acc`` and ``robust_acc[attack][i]`` (accuracy at ``eps[i]``). Every combination of
    attack and norm is checked before any work (``cw`` is l_2 only, ``autoattack`` l_inf or l_2, and
    both need torchattacks). With ``progress`` a bar counts images times (attack, eps) pairs and names
    the pair being run: C&W and AutoAttack take far longer per image than FGSM and PGD.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    attacks = list(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    check_attack_norm(attacks, norm)
    if "pgd" in attacks:
        check_pgd_options(steps, restarts)
    device = torch.device(device)
    model = model.to(device)
    clean = torch.zeros((), dtype=torch.long, device=device)
    robust = {a: torch.zeros(len(eps_list), dtype=torch.long, device=device) for a in attacks}
    count = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(loader.dataset) * len(attacks) * len(eps_list), unit="img", desc=f"attack {norm}",
                   dynamic_ncols=True)
    try:
        with evaluation_pass(model, loader, device, f"attack {norm}", progress=False) as batches:
            for x, y in batches:
                with torch.no_grad():
                    correct = logits_of(model, x).argmax(1) == y
                clean += correct.sum()
                count += y.numel()
                for attack in attacks:
                    for i, eps in enumerate(eps_list):
                        if bar is not None:
                            bar.set_postfix_str(f"{attack} eps={eps:g}", refresh=True)
                        x_adv = run_attack(attack, model, x, y, eps, norm, steps=steps, restarts=restarts,
                                           num_classes=num_classes)
                        with torch.no_grad():
                            robust[attack][i] += (correct & (logits_of(model, x_adv).argmax(1) == y)).sum()
                        if bar is not None:
                            bar.update(y.numel())
    finally:
        if bar is not None:
            bar.close()
    result = dict(norm=norm, eps=[float(e) for e in eps_list], attacks=list(attacks), steps=steps,
                  restarts=restarts, n=count, clean_acc=clean.item() / count,
                  robust_acc={a: (r.double() / count).tolist() for a, r in robust.items()})
    if "cw" in attacks or "autoattack" in attacks:
        result["torchattacks"] = getattr(require_torchattacks("C&W/AutoAttack"), "__version__", "unknown")
    return result


def check_attack_norm(attacks, norm: str) -> None:
    """Refuse, before any work, an attack that does not support ``norm`` or whose extra is missing."""
    if "cw" in attacks and norm != "l2":
        raise ValueError(f"attack cw is an l2 attack (C&W l_2); got norm {norm}: use --norm l2")
    if "autoattack" in attacks and norm not in ("linf", "l2"):
        raise ValueError(f"attack autoattack supports norms linf and l2; got norm {norm}")
    for name, label in (("cw", "C&W"), ("autoattack", "AutoAttack")):
        if name in attacks:
            require_torchattacks(label)


def attack_table(result: dict) -> str:
    """Markdown table: one row per eps, one column per attack (robust accuracy in %)."""
    head = f"| eps ({result['norm']}) | " + " | ".join(result["attacks"]) + " |"
    rule = "|---|" + "---|" * len(result["attacks"])
    rows = [f"| {eps:g} | " + " | ".join(f"{100 * result['robust_acc'][a][i]:.2f}" for a in result["attacks"])
            + " |" for i, eps in enumerate(result["eps"])]
    summary = f"clean accuracy {100 * result['clean_acc']:.2f}% on {result['n']} images"
    return "\n".join([summary, "", head, rule] + rows)
