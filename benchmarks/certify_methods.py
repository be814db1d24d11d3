"""Certified radius of a briefly trained final network by each bound method (docs/bounds.md).

A DARTS_V2 network (C=8, 4 cells, eval mode) trained for ``--steps`` SGD steps on mnist-mini, then
``dsrna.bounds.certified_radius`` (l_inf, float64) of its first ``--images`` test images by each
method: the radii (0 for a misclassified image) and the seconds each method took.

    PYTHONPATH=. python benchmarks/certify_methods.py [--methods crown-ibp,crown-symbolic] [--images 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dsrna import DARTS_V2, Network
from dsrna.bounds import certified_radius
from dsrna.data import get_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="crown-ibp,crown-symbolic")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-eps", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = Network(DARTS_V2, 8, 10, 4, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(get_dataset("mnist-mini", train=True), batch_size=64, shuffle=True)
    net.train()
    for (x, y), _ in zip(loader, range(args.steps)):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net = net.eval().double()
    test = get_dataset("mnist-mini", train=False)
    x = torch.stack([test[i][0] for i in range(args.images)]).double()
    y = torch.tensor([test[i][1] for i in range(args.images)])
    with torch.no_grad():
        correct = (net(x).argmax(1) == y).tolist()
    print(f"# DARTS_V2, C=8, 4 cells, {args.steps} SGD steps on mnist-mini; l_inf, float64, 1 thread; "
          f"correctly classified: {correct}\n")
    print("| method | certified radius per image | seconds |")
    print("|---|---|---|")
    for method in args.methods.split(","):
        start = time.perf_counter()
        radius = certified_radius(net, x, y, norm="linf", method=method, max_eps=args.max_eps, tol=1e-4)
        print(f"| {method} | {', '.join(f'{r:.4f}' for r in radius.tolist())} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
