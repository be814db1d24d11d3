"""Evidence for the default eps of R_CB (METHOD.md §2 "Beware"): R_CB of the search super-network
at initialisation over a log grid of eps, IBP and CROWN-IBP, train-mode BN with the clean batch's
statistics (as in the search). Prints one markdown row per (data set, norm, method, eps).

    PYTHONPATH=. python benchmarks/eps_sweep.py [--batch 8] [--norm linf]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from dsrna import SearchNetwork
from dsrna.bounds import margin_lower_bound

GRID = {"linf": (1e-6, 1e-5, 1e-4, 1e-3), "l2": (1e-5, 1e-4, 1e-3, 1e-2)}
CROWN_IBP_GRID = {"linf": (1e-5, 1e-4, 1e-3), "l2": (1e-4, 1e-3, 1e-2)}


def _batch(name: str, batch: int):
    """MNIST: the shipped mnist-mini; CIFAR-10 (not shipped): random images of its size."""
    if name == "mnist-mini":
        from dsrna.data import dataset_info, get_dataset

        data = get_dataset(name, train=False)
        x = torch.stack([data[i][0] for i in range(batch)])
        y = torch.tensor([data[i][1] for i in range(batch)])
        info = dataset_info(name)
        return x, y, info.mean, info.std
    return torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,)), [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--norm", choices=sorted(GRID), default="linf")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, batch {args.batch}, seed {args.seed}")
    print("| data set | norm | method | eps | R_CB (min) | mean margin | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in ("mnist-mini", "cifar10"):
        torch.manual_seed(args.seed)
        x, y, mean, std = _batch(name, args.batch)
        net = SearchNetwork(C=16, num_classes=10, layers=8, in_channels=x.shape[1], mean=mean, std=std)
        for method, grid in (("ibp", GRID[args.norm]), ("crown-ibp", CROWN_IBP_GRID[args.norm])):
            for eps in grid:
                start = time.perf_counter()
                with torch.no_grad():
                    gamma = margin_lower_bound(net, x, y, eps, args.norm, method)
                seconds = time.perf_counter() - start
                label = torch.nn.functional.one_hot(y, 10).bool()
                r_min = gamma.masked_fill(label, float("inf")).min(1).values.mean().item()
                r_mean = gamma.masked_fill(label, 0.0).sum(1).div(9).mean().item()
                print(f"| {name} | {args.norm} | {method} | {eps:g} | {r_min:.4g} | {r_mean:.4g} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
