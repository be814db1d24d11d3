"""Evidence for how R_CB is computed in the search (METHOD.md §2 "Beware"; docs/bounds.md).

Tables, each a markdown block on stdout:

1. ``init``: the certified margin bound of the search super-network at initialisation (train-mode
   batch norm with the clean batch's statistics, as in the search), float64, for IBP and CROWN-IBP
   over a grid of eps around the data set's default: the raw bound, R_CB on the "asinh" scale, and
   the norm of its gradient in alpha (finite and nonzero means usable by the architecture step).
2. ``rank``: whether R_CB orders architectures the way their measured sensitivity does. Random
   architectures (alpha ~ N(0, 2^2), peaked softmax), same weights: R_CB ("asinh", IBP and
   CROWN-IBP) against minus the log of the mean l1 norm of the input gradient of the margin
   (the first-order worst-case margin loss per unit l_inf eps); Spearman rank correlation.
3. ``search``: R_CB along a short DSRNA-CB search, from its ``log.jsonl`` (``--search-log``).
4. ``tight``: how close the certified bound comes to the truth at small eps, CROWN-IBP against
   CROWN-symbolic: the clean min margin, its certified lower bound, and a PGD attack's min margin
   (an upper bound of the true worst case); "certified/attacked drop" is ``(clean - bound) /
   (clean - attacked)``: 1 for an exact bound, the looseness factor otherwise (the median over the
   bounded images, and the worst image's).
5. ``along``: the ``tight`` table at several steps of a first-order search (``--along-steps``).
6. ``share``: how much of R_CB's architecture gradient is robustness rather than clean margin: its
   gradient against the same bound's at eps 0 (relative difference and cosine).

    PYTHONPATH=. python benchmarks/cb_evidence.py [--part init,rank,tight,along] [--layers 8 --channels 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from dsrna import SearchNetwork
from dsrna.attacks import project
from dsrna.bounds import BoundModel, margin_lower_bound
from dsrna.bounds.engine import DEFAULT_ERROR_SYMBOLS
from dsrna.robustness import RobustnessConfig
from dsrna.robustness.certified import certified_bound_metric, default_eps, dithered
from dsrna.space import capture_batch_stats, frozen_batch_stats

CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _batch(name: str, batch: int, image: int = 32):
    """The first test images of a data set on disk (mnist-mini is shipped; mnist and fashion-mnist are
    read from ``$DSRNA_DATA_ROOT``); CIFAR-10: random 3-channel images of ``image``^2 pixels (32: its size)."""
    if name != "cifar10":
        from dsrna.data import dataset_info, get_dataset

        data = get_dataset(name, train=False)
        x = torch.stack([data[i][0] for i in range(batch)])
        y = torch.tensor([data[i][1] for i in range(batch)])
        info = dataset_info(name)
        return x, y, info.mean, info.std
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch, 3, image, image, generator=generator), torch.randint(0, 10, (batch,), generator=generator),
            CIFAR_MEAN, CIFAR_STD)


def _setup(name: str, args) -> tuple[torch.Tensor, torch.Tensor, SearchNetwork]:
    """The batch of data set ``name`` and a freshly initialised super-network in search mode (seeded)."""
    torch.manual_seed(args.seed)
    x, y, mean, std = _batch(name, args.batch, args.image)
    net = SearchNetwork(C=args.channels, num_classes=10, layers=args.layers, in_channels=x.shape[1],
                        mean=mean, std=std).train()
    return x, y, net


def _min_margin(gamma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gamma.masked_fill(torch.nn.functional.one_hot(y, gamma.shape[1]).bool(), float("inf")).min(1).values


def _arch_grad(net: SearchNetwork) -> torch.Tensor:
    """The architecture parameters' gradient, flat (alphas of a cell type the network lacks, e.g. no
    normal cell with 2 layers, get none)."""
    return torch.cat([p.grad.flatten() for p in net.arch_parameters() if p.grad is not None])


def _bound_images(x: torch.Tensor, n: int, args) -> torch.Tensor:
    """The first ``n`` images of the batch dithered as R_CB dithers them (``--dither``), with a fixed seed."""
    return dithered(x[:n], args.dither, torch.Generator().manual_seed(2))


def _certified_min_margin(net: SearchNetwork, batch: torch.Tensor, x, y, eps: float, norm: str, method: str,
                          args) -> tuple[torch.Tensor, torch.Tensor]:
    """As the search computes R_CB: the float64 certified min margin ``[B]`` of ``(x, y)`` with the
    batch norms at ``batch``'s statistics, and the architecture gradient of its mean."""
    net.zero_grad()
    with capture_batch_stats() as stats:  # in the autograd graph, as in the search
        net(batch)
    model = BoundModel(net, stats, dtype=torch.float64, max_error_symbols=args.max_error_symbols)
    bound = _min_margin(model.margin_lower_bound(x, y, eps, norm, method), y)
    bound.mean().backward()  # R_CB on the linear scale
    return bound.detach(), _arch_grad(net)


def part_init(args) -> None:
    print("\n## init: R_CB of the super-network at initialisation (float64 bound pass)\n")
    print("| data set | method | eps | min-margin bound (mean) | R_CB asinh | ‖dR/dalpha‖ | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        x, y, net = _setup(name, args)
        base = default_eps(name, "linf")
        for method in ("ibp", "crown-ibp"):
            for eps in (base / 10, base, base * 10):
                start = time.perf_counter()
                net.zero_grad()
                with capture_batch_stats() as stats:  # in the autograd graph, as in the search: once per backward
                    net(x)
                r = certified_bound_metric(net, x, y, eps, "linf", method, bn_stats=stats, scale="asinh", dtype=torch.float64)
                r.backward()
                with torch.no_grad():
                    raw = _min_margin(margin_lower_bound(net, x, y, eps, "linf", method, bn_stats=stats, dtype=torch.float64), y)
                grad = _arch_grad(net).norm().item()
                print(f"| {name} | {method} | {eps:g} | {raw.mean().item():.3g} | {r.item():.2f} | {grad:.3g} | "
                      f"{time.perf_counter() - start:.1f} |", flush=True)


def _sensitivity(net, x, y, stats) -> float:
    """Mean over images of ``||grad_x (f_y - f_t*)||_1``, t* the best other class (frozen BN statistics)."""
    x = x.clone().requires_grad_()
    with frozen_batch_stats(stats):
        logits = net(x)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    margin = logits.gather(1, y[:, None]).squeeze(1) - others.max(1).values
    grad, = torch.autograd.grad(margin.sum(), x)
    return grad.flatten(1).abs().sum(1).mean().item()


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def part_rank(args) -> None:
    print(f"\n## rank: R_CB against measured sensitivity over {args.architectures} random architectures\n")
    print("| data set | eps | method | Spearman(R_CB, -log sensitivity) | R_CB range (asinh) | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        x, y, net = _setup(name, args)
        eps = default_eps(name, "linf")
        start = time.perf_counter()
        scores = {"ibp": [], "crown-ibp": []}
        minus_log_sensitivity = []
        for _ in range(args.architectures):
            with torch.no_grad():
                for p in net.arch_parameters():
                    p.copy_(2.0 * torch.randn_like(p))
            with capture_batch_stats() as stats:
                net(x)
            minus_log_sensitivity.append(-torch.tensor(_sensitivity(net, x, y, stats)).log().item())
            with torch.no_grad():
                for method, values in scores.items():
                    values.append(certified_bound_metric(net, x, y, eps, "linf", method, bn_stats=stats, scale="asinh",
                                                         dtype=torch.float64).item())
        seconds = time.perf_counter() - start
        for method, values in scores.items():
            print(f"| {name} | {eps:g} | {method} | {_spearman(values, minus_log_sensitivity):+.2f} | "
                  f"{min(values):.1f} .. {max(values):.1f} | {seconds:.0f} |", flush=True)


def _attacked_min_margin(net, x, y, stats, eps: float, norm: str, steps: int = 20) -> torch.Tensor:
    """PGD (l_inf or l_2, random start, inside [0, 1]) on the min margin, frozen batch statistics:
    ``[B]``, at least the true worst case."""
    generator = torch.Generator().manual_seed(0)
    x_adv = project(x + (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * eps, x, eps, norm)
    worst = None
    for _ in range(steps + 1):
        x_adv.requires_grad_()
        with frozen_batch_stats(stats):
            logits = net(x_adv)
        margin = _min_margin(logits.gather(1, y[:, None]) - logits, y)
        worst = margin.detach() if worst is None else torch.minimum(worst, margin.detach())
        grad, = torch.autograd.grad(margin.sum(), x_adv)
        direction = grad.sign() if norm == "linf" else grad / grad.flatten(1).norm(dim=1).clamp(min=1e-30)[:, None, None, None]
        x_adv = project(x_adv.detach() - eps / 4 * direction, x, eps, norm)
    return worst


_TIGHT_COLUMNS = ("| norm | eps | method | clean min margin | certified bound | attacked (PGD-20) | "
                  "certified/attacked drop (median) | worst image's | ‖dR/dalpha‖ | seconds |")


def _tight_rows(first: str, net: SearchNetwork, x: torch.Tensor, y: torch.Tensor, args) -> None:
    """One table row per norm, eps and method for ``net`` on the batch ``(x, y)``, led by ``first``:
    as in the search, the batch norms use the statistics of the whole batch and the bounds cover its
    first ``--bound-images`` images (with one image's own statistics a search super-network's logits
    hardly depend on the image: every candidate ends in a batch norm, so every channel's spatial mean
    is zero and the global pooling sees only rounding)."""
    n = args.bound_images or x.shape[0]
    # Clean margins and the attack on a float64 twin with the float32 clean batch's statistics, the
    # function the bounds certify: in float32 the rounding of x + delta (about 3e-8 near 0.5) is
    # several percent of the eps measured here, and the twin's own float64 statistics would move
    # the margins by more than the certified drop at 1e-5.
    twin = copy.deepcopy(net).double()
    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)
    twins = dict(zip(net.modules(), twin.modules()))
    twin_stats = {twins[bn]: tuple(v.double() for v in values) for bn, values in stats.items()}
    # Clean margin, attack and bound all at the dithered point; the batch norms keep the clean batch's
    # statistics, as in the search.
    batch, (x, y) = x, (_bound_images(x, n, args), y[:n])
    with torch.no_grad(), frozen_batch_stats(twin_stats):
        logits = twin(x.double())
    clean = _min_margin(logits.gather(1, y[:, None]) - logits, y)
    for norm, eps in ((norm, eps) for norm in args.norms for eps in args.eps):
        attacked = _attacked_min_margin(twin, x.double(), y, twin_stats, eps, norm)
        for method in args.methods:
            start = time.perf_counter()
            bound, grad = _certified_min_margin(net, batch, x, y, eps, norm, method, args)
            drop = (clean - bound) / (clean - attacked)  # both float64
            print(f"| {first} | {norm} | {eps:g} | {method} | {clean.mean():.4g} | {bound.mean().item():.4g} | "
                  f"{attacked.mean():.4g} | {drop.median().item():.3g} | {drop.max().item():.3g} | {grad.norm():.3g} | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)


def part_share(args) -> None:
    """How much of R_CB's architecture gradient is robustness: the gradient of the certified min
    margin at each eps against its gradient at eps 0 (the clean min margin, through the same graph)."""
    print("\n## share: R_CB's alpha-gradient against the clean margin's (float64 bound pass)\n")
    print("| data set | norm | eps | method | ‖dR/dalpha‖ | ‖dR/dalpha - dm/dalpha‖ / ‖dm/dalpha‖ | cosine |")
    print("|---|---|---|---|---|---|---|")
    for name in args.datasets:
        x, y, net = _setup(name, args)
        n = args.bound_images or x.shape[0]
        bound_images = _bound_images(x, n, args)
        for method in args.methods:
            _, clean = _certified_min_margin(net, x, bound_images, y[:n], 0.0, "linf", method, args)
            for norm, eps in ((norm, eps) for norm in args.norms for eps in args.eps):
                _, g = _certified_min_margin(net, x, bound_images, y[:n], eps, norm, method, args)
                print(f"| {name} | {norm} | {eps:g} | {method} | {g.norm():.4g} | {(g - clean).norm() / clean.norm():.3g} | "
                      f"{torch.nn.functional.cosine_similarity(g, clean, dim=0):.4f} |", flush=True)


def part_tight(args) -> None:
    print("\n## tight: certified min-margin bound against an attack at small eps (float64 bound pass)\n")
    print("| data set " + _TIGHT_COLUMNS)
    print("|---" * 11 + "|")
    for name in args.datasets:
        x, y, net = _setup(name, args)
        _tight_rows(name, net, x, y, args)


def part_along(args) -> None:
    """``tight`` along a first-order DARTS search (default settings) of the super-network on the
    data set's batch: a CIFAR-10-like run has no real data here, so the search fits random labels
    of random images, which moves the weights, the architecture and the margins all the same."""
    steps = sorted(int(s) for s in args.along_steps.split(","))
    print(f"\n## along: certified min-margin bound along a first-order search (steps {steps})\n")
    print("| data set | search step " + _TIGHT_COLUMNS)
    print("|---" * 12 + "|")
    from dsrna.search.config import SearchConfig
    from dsrna.search.searcher import Searcher

    for name in args.datasets:
        x, y, net = _setup(name, args)
        searcher = Searcher(net, SearchConfig(dataset=name, layers=args.layers, init_channels=args.channels))
        half = x.shape[0] // 2  # the search's two halves: weights on one, architecture on the other
        for step in range(steps[-1] + 1):
            if step in steps:
                _tight_rows(f"{name} | {step}", net, x, y, args)
            searcher.step((x[half:], y[half:]), (x[:half], y[:half]))


def part_search(args) -> None:
    print(f"\n## search: R_CB along a DSRNA-CB search ({args.search_log})\n")
    print("| epoch | R (asinh R_CB) | val accuracy |")
    print("|---|---|---|")
    with open(args.search_log) as f:
        for line in f:
            row = json.loads(line)
            if "robustness" in row:
                print(f"| {row.get('epoch')} | {row['robustness']:.3f} | {row.get('val_acc', row.get('val_accuracy', ''))} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="init,rank", help="comma list of init, rank, search, tight, along, share")
    parser.add_argument("--datasets", default="mnist-mini,cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--architectures", type=int, default=12)
    parser.add_argument("--search-log", help="log.jsonl of a `dsrna search --robustness cb` run (part search)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", type=int, default=32, help="side of the random CIFAR-10-like images")
    parser.add_argument("--eps", default="1e-5,1e-4,1e-3", help="parts tight, along, share: comma list")
    parser.add_argument("--along-steps", default="0,20,50,100", help="part along: the search steps measured")
    parser.add_argument("--bound-images", type=int, help="parts tight, along and share: bound the first N "
                        "images of the batch, with the whole batch's batch-norm statistics (default: all)")
    parser.add_argument("--norms", default="linf", help="parts tight, along, share: comma list of linf, l2")
    parser.add_argument("--methods", default="crown-ibp,crown-symbolic", help="parts tight, along, share: comma list")
    parser.add_argument("--dither", type=float, default=RobustnessConfig.cb_dither,
                        help="parts tight, along, share: R_CB's dither of the bound images (0: none)")
    parser.add_argument("--max-error-symbols", type=int, default=DEFAULT_ERROR_SYMBOLS, help="parts tight, along, share: crown-symbolic's budget")
    args = parser.parse_args()
    args.datasets = args.datasets.split(",")
    args.eps = [float(e) for e in args.eps.split(",")]
    args.methods = args.methods.split(",")
    args.norms = args.norms.split(",")
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}, {platform.machine()}, 1 thread; super-network C={args.channels}, "
          f"{args.layers} cells, batch {args.batch}, seed {args.seed}; cifar10: random {args.image}x{args.image} images")
    parts = {"init": part_init, "rank": part_rank, "search": part_search, "tight": part_tight, "along": part_along,
             "share": part_share}
    for part in args.part.split(","):
        parts[part](args)


if __name__ == "__main__":
    main()
