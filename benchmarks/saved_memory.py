"""Activation memory of one train step, per backend: the bytes autograd keeps for backward.

Peak memory is measured by the harness on a GPU only; this counts, on any device, the distinct
storages saved for backward during the super-network's forward and loss (a tensor saved by several
ops, or a view of a saved tensor, counts once), which is what bounds the batch size.

    PYTHONPATH=. python benchmarks/saved_memory.py [--batch 8 --init-channels 16 --layers 8 --device cpu]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from dsrna import SearchNetwork, backend


def saved_bytes(net: SearchNetwork, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """``(bytes, storages)`` saved for backward by the forward pass and the cross-entropy."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(net(x), y)
    return sum(storages.values()), len(storages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--init-channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="reference,native,triton")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = SearchNetwork(C=args.init_channels, layers=args.layers).to(args.device)
    x = torch.rand(args.batch, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    print(f"C={args.init_channels}, {args.layers} cells, batch {args.batch}, 32x32, float32, train mode, {args.device}\n")
    print("| backend | saved for backward (MiB) | storages | vs reference |")
    print("|---|---|---|---|")
    reference = None
    for name in args.backends.split(","):
        ok, why = backend.backend_status(name, torch.device(args.device).type)
        if not ok:
            print(f"| {name} | unavailable: {why} | | |")
            continue
        net.backend = name
        nbytes, count = saved_bytes(net, x, y)
        if name == "reference":
            reference = nbytes
        ratio = f"{nbytes / reference:.2f}" if reference else ""
        print(f"| {name} | {nbytes / 2**20:.1f} | {count} | {ratio} |")


if __name__ == "__main__":
    main()
