"""Footprint of one train step, per backend, on any device: the activation memory autograd keeps for
backward, and the ops one forward dispatches (an estimate of GPU kernel launches, for a CPU); with
``--bound-methods``, the peak host memory of one no-grad margin bound pass per method instead.

Peak memory and kernel counts are measured by the harness on a GPU only. Here: the distinct storages
saved for backward during the super-network's forward and loss (a tensor saved by several ops, or a
view of a saved tensor, counts once), which is what bounds the batch size; and the top-level compute
ops of a no-grad forward under torch.profiler (views, reshapes and allocations left out; a
multi-tensor ``_foreach`` op counts once, as it launches once on a GPU).

    PYTHONPATH=. python benchmarks/footprint.py [--batch 8 --init-channels 16 --layers 8 --device cpu]
    PYTHONPATH=. python benchmarks/footprint.py --bound-methods ibp,crown-ibp [--keep-all-bounds]
    PYTHONPATH=. python benchmarks/footprint.py --bound-methods crown-ibp,crown --float64 --image 8 --eps 1e-6 --bound-images 1
    PYTHONPATH=. python benchmarks/footprint.py --recompute-cost 10 [--backend native]

``--recompute-cost N``: what the batched cell's recomputation of its depthwise stages in backward
saves and costs, both measured in one process: the bytes saved for backward and the median of N
train steps (forward, loss, backward), with the recomputation and without it, the two alternating.

A bound pass's peak is the growth of the process's peak resident memory over the pass (a fresh
process per method: that peak only ever grows), with its seconds; l_inf at CIFAR-10's default eps unless
``--eps``; the batch norms take the whole batch's statistics, as in the search, and the pass bounds its
first ``--bound-images`` images (default all); ``--float64`` for the methods whose intervals overflow
float32 on the deep super-network (crown-ibp and crown, docs/bounds.md).
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import subprocess
import sys
import time

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


# Ops that launch no kernel of their own.
_NO_KERNEL = frozenset({
    "view", "slice", "as_strided", "select", "unbind", "split", "split_with_sizes", "narrow", "empty", "empty_like",
    "t", "transpose", "expand", "reshape", "detach", "alias", "unsqueeze", "squeeze", "permute", "chunk", "flatten",
    "empty_strided", "resize_", "lift_fresh", "_reshape_alias", "contiguous", "result_type", "item",
    "_local_scalar_dense", "unflatten", "_unsafe_view", "to",
})


def forward_ops(net: SearchNetwork, x: torch.Tensor) -> int:
    """Top-level compute ops (aten:: and dsrna::) of one no-grad forward."""
    from torch.profiler import profile

    def ours(event) -> bool:
        return event is not None and event.name.startswith(("aten::", "dsrna::"))

    with torch.no_grad():
        net(x)
        with profile() as prof:
            net(x)
    return sum(1 for e in prof.events()
               if ours(e) and not ours(e.cpu_parent) and e.name.split("::")[-1] not in _NO_KERNEL)


def bound_pass_cost(net: SearchNetwork, x: torch.Tensor, method: str, eps: float, bound_images: int,
                    keep_all_bounds: bool) -> tuple[float, float]:
    """``(seconds, GiB)`` of one no-grad pass bounding the margins of class 0 on the first
    ``bound_images`` images of ``x``, under the statistics of all of ``x``; GiB is the growth of this
    process's peak resident memory over the pass (Linux counts ru_maxrss in KiB)."""
    from dsrna.bounds import BoundModel, margin_spec
    from dsrna.space import capture_batch_stats

    with torch.no_grad(), capture_batch_stats() as stats:
        net(x)
    x = x[:bound_images]
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with torch.no_grad():
        prop = BoundModel(net, stats).propagation(x, eps, "linf", method, keep_all_bounds=keep_all_bounds)
        prop.lower_bound(margin_spec(torch.zeros(len(x), dtype=torch.long), 10, x.dtype))
    return time.perf_counter() - start, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20


@contextlib.contextmanager
def without_recomputation():
    """Inside, the batched cell keeps its depthwise stages' intermediate maps for backward, as
    before the recomputation (``dsrna/space/batched_cell.py``)."""
    from dsrna.space import batched_cell

    recomputed = batched_cell._recomputed
    batched_cell._recomputed = lambda fn, *inputs: fn(*inputs)
    try:
        yield
    finally:
        batched_cell._recomputed = recomputed


def train_step_ms(net: SearchNetwork, x: torch.Tensor, y: torch.Tensor) -> float:
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    F.cross_entropy(net(x), y).backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return (time.perf_counter() - start) * 1e3


def recompute_cost(net: SearchNetwork, x: torch.Tensor, y: torch.Tensor, repeats: int) -> None:
    variants = {"recomputed (the library)": contextlib.nullcontext, "kept (no recomputation)": without_recomputation}
    saved, times = {}, {name: [] for name in variants}
    for name, context in variants.items():
        with context():
            saved[name] = saved_bytes(net, x, y)[0]
            train_step_ms(net, x, y)  # warm-up
    for _ in range(repeats):  # alternating, so that a slow spell of the machine hits both
        for name, context in variants.items():
            with context():
                times[name].append(train_step_ms(net, x, y))
    base = statistics.median(times["kept (no recomputation)"])
    print("| depthwise stages | saved for backward (MiB) | train step ms (median) | time vs kept |")
    print("|---|---|---|---|")
    for name in variants:
        median = statistics.median(times[name])
        print(f"| {name} | {saved[name] / 2**20:.1f} | {median:.0f} | {median / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--init-channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="reference,native,triton")
    parser.add_argument("--bound-methods", help="comma-separated bound methods: report their passes' peak memory (CPU)")
    parser.add_argument("--keep-all-bounds", action="store_true", help="keep every node's interval (the old behaviour)")
    parser.add_argument("--one-bound-pass", help=argparse.SUPPRESS)  # the child process of --bound-methods
    parser.add_argument("--image", type=int, default=32, help="side of the random 3-channel images")
    parser.add_argument("--float64", action="store_true", help="network and images in float64")
    parser.add_argument("--eps", type=float, help="--bound-methods: l_inf budget (default: CIFAR-10's default)")
    parser.add_argument("--bound-images", type=int, help="--bound-methods: bound the first N images of the batch")
    parser.add_argument("--recompute-cost", type=int, metavar="N",
                        help="time N train steps with and without the depthwise stages' recomputation")
    parser.add_argument("--backend", default="native", help="--recompute-cost: a fast backend (the batched cell)")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.float64 if args.float64 else torch.float32
    net = SearchNetwork(C=args.init_channels, layers=args.layers).to(args.device, dtype)
    x = torch.rand(args.batch, 3, args.image, args.image, device=args.device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    if args.one_bound_pass:
        from dsrna.robustness.certified import default_eps

        eps = args.eps if args.eps is not None else default_eps("cifar10", "linf")
        print(*bound_pass_cost(net, x, args.one_bound_pass, eps, args.bound_images or args.batch, args.keep_all_bounds))
        return
    shape = (f"C={args.init_channels}, {args.layers} cells, batch {args.batch}, {args.image}x{args.image}, "
             f"{dtype}".replace("torch.", ""))
    if args.bound_methods:
        kept = "every interval kept" if args.keep_all_bounds else "intervals released after their last use"
        bounded = f", the first {args.bound_images} bounded" if args.bound_images else ""
        print(f"{shape}{bounded}, l_inf eps {args.eps or 'CIFAR-10 default'}, no gradient, {kept}, "
              f"{torch.get_num_threads()} threads\n")
        print("| method | seconds | peak growth (GiB) |")
        print("|---|---|---|")
        for method in args.bound_methods.split(","):
            child = [sys.executable, __file__, "--one-bound-pass", method]
            child += [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                      ("batch", "init_channels", "layers", "image", "eps", "bound_images", "threads")
                      if getattr(args, name) is not None]
            child += ["--keep-all-bounds"] * args.keep_all_bounds + ["--float64"] * args.float64
            seconds, peak = map(float, subprocess.run(child, check=True, capture_output=True, text=True).stdout.split()[-2:])
            print(f"| {method} | {seconds:.1f} | {peak:.2f} |")
        return
    print(f"{shape}, train mode, {args.device}"
          f"{f', {torch.get_num_threads()} threads' if args.device == 'cpu' else ''}\n")
    if args.recompute_cost:
        net.backend = args.backend
        recompute_cost(net, x, y, args.recompute_cost)
        return
    print("| backend | saved for backward (MiB) | storages | vs reference | ops per forward |")
    print("|---|---|---|---|---|")
    reference = None
    for name in args.backends.split(","):
        ok, why = backend.backend_status(name, torch.device(args.device).type)
        if not ok:
            print(f"| {name} | unavailable: {why} | | | |")
            continue
        net.backend = name
        nbytes, count = saved_bytes(net, x, y)
        if name == "reference":
            reference = nbytes
        ratio = f"{nbytes / reference:.2f}" if reference else ""
        print(f"| {name} | {nbytes / 2**20:.1f} | {count} | {ratio} | {forward_ops(net, x)} |")


if __name__ == "__main__":
    main()
