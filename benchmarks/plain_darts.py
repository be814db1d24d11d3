"""A plain eager DARTS super-network, the measurement baseline of ``../shared/BASELINE.md``.

This is the straightforward port a user would write (one ``nn.Module`` per op, ``torch.nn.BatchNorm2d``,
``nn.Conv2d(groups=C)`` for the depthwise convs, ``MixedOp = sum(w * op(x))`` over all eight candidates
including ``none``, softmax(alpha) recomputed per cell), over the same space as
``dsrna.SearchNetwork``: C channels, ``layers`` cells with reductions at 1/3 and 2/3, 4 steps, 14 edges,
BN ``affine=False`` everywhere (stem included), inputs normalised inside. Its parameters are declared in
the same order and shapes as ``SearchNetwork``'s, so :func:`copy_weights` makes the two compute the same
function (checked by ``--check``).

Run as a script it times both, side by side in one process::

    OMP_NUM_THREADS=1 python benchmarks/plain_darts.py                        # CPU, tiny shape: overhead
    python benchmarks/plain_darts.py --device cuda --batch 64                 # BASELINE.md's shape
    OMP_NUM_THREADS=1 python benchmarks/plain_darts.py --profile              # + aten ops / Python calls

forward = no-grad forward in train mode (batch statistics); train = forward, cross-entropy, backward,
SGD step on the weights. Median of ``--repeats`` timed runs after ``--warmup`` (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # run as a script; after PYTHONPATH, so another dsrna copy can be compared
from benchmarks.harness import median_us  # noqa: E402

PRIMITIVES = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_out, kernel_size, stride, padding, bias=False),
                                nn.BatchNorm2d(C_out, affine=False))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation, groups=C_in, bias=False),
                                nn.Conv2d(C_in, C_out, 1, bias=False),
                                nn.BatchNorm2d(C_out, affine=False))

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding):
        super().__init__()
        self.op = nn.Sequential(nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_in, kernel_size, stride, padding, groups=C_in, bias=False),
                                nn.Conv2d(C_in, C_in, 1, bias=False),
                                nn.BatchNorm2d(C_in, affine=False),
                                nn.ReLU(inplace=False),
                                nn.Conv2d(C_in, C_in, kernel_size, 1, padding, groups=C_in, bias=False),
                                nn.Conv2d(C_in, C_out, 1, bias=False),
                                nn.BatchNorm2d(C_out, affine=False))

    def forward(self, x):
        return self.op(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, ::self.stride, ::self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=False)

    def forward(self, x):
        x = self.relu(x)
        # DARTS' x[:, :, 1:, 1:], zero-padded so odd sizes work too (the same for even sizes)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(shifted)], dim=1))


def make_op(name, C, stride):
    if name == "none":
        return Zero(stride)
    if name == "max_pool_3x3":
        return nn.Sequential(nn.MaxPool2d(3, stride, 1), nn.BatchNorm2d(C, affine=False))
    if name == "avg_pool_3x3":
        return nn.Sequential(nn.AvgPool2d(3, stride, 1, count_include_pad=False), nn.BatchNorm2d(C, affine=False))
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C)
    if name == "sep_conv_3x3":
        return SepConv(C, C, 3, stride, 1)
    if name == "sep_conv_5x5":
        return SepConv(C, C, 5, stride, 2)
    if name == "dil_conv_3x3":
        return DilConv(C, C, 3, stride, 2, 2)
    if name == "dil_conv_5x5":
        return DilConv(C, C, 5, stride, 4, 2)
    raise ValueError(name)


class MixedOp(nn.Module):
    def __init__(self, C, stride):
        super().__init__()
        self.ops = nn.ModuleList(make_op(p, C, stride) for p in PRIMITIVES)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class Cell(nn.Module):
    def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        self.steps, self.multiplier = steps, multiplier
        self.preprocess0 = FactorizedReduce(C_prev_prev, C) if reduction_prev else ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        self.edges = nn.ModuleList()
        for i in range(steps):
            for j in range(2 + i):
                self.edges.append(MixedOp(C, 2 if reduction and j < 2 else 1))

    def forward(self, s0, s1, weights):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            s = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self.multiplier:], dim=1)


class PlainSearchNetwork(nn.Module):
    def __init__(self, C=16, num_classes=10, layers=8, in_channels=3, steps=4, multiplier=4, stem_multiplier=3):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("std", torch.ones(1, in_channels, 1, 1))
        C_curr = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(C_curr, affine=False))
        C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            self.cells.append(Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev))
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, multiplier * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(PRIMITIVES)))

    def weight_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def forward(self, x):
        s0 = s1 = self.stem((x - self.mean) / self.std)
        for cell in self.cells:
            alpha = self.alphas_reduce if cell.reduction else self.alphas_normal
            s0, s1 = s1, cell(s0, s1, F.softmax(alpha, dim=-1))
        return self.classifier(self.global_pooling(s1).flatten(1))


def copy_weights(plain: PlainSearchNetwork, net: nn.Module) -> None:
    """Copy ``net``'s (a ``dsrna.SearchNetwork``) parameters into ``plain``, in declaration order."""
    mine, theirs = list(plain.parameters()), list(net.parameters())
    if [p.shape for p in mine] != [p.shape for p in theirs]:
        raise ValueError("parameter lists differ: not the same space")
    with torch.no_grad():
        for a, b in zip(mine, theirs):
            a.copy_(b)


# --- measurement ----------------------------------------------------------------------------------------


def _steps(net, x, y, weight_params):
    optimizer = torch.optim.SGD(weight_params, lr=0.025, momentum=0.9, weight_decay=3e-4)

    def forward():
        with torch.no_grad():
            return net(x)

    def train():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()

    return {"forward": forward, "train": train}


def _counts(fn, device):
    """(aten ops, Python function calls, CUDA kernels) of one call of ``fn``."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU")
    kernels = sum(1 for e in events if e.device_type.name == "CUDA")
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    calls = pstats.Stats(pr).total_calls
    return aten, calls, kernels


def breakdown(fns: dict, device, top: int = 25) -> None:
    """Per aten op / autograd node: calls and self CPU ms of one step, for each net, sorted by the
    difference of the last net's self CPU time against the first's."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for kind, fn in fns.items():
        with profile(activities=activities) as prof:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        tables[kind] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
    kinds = list(tables)
    first, last = tables[kinds[0]], tables[kinds[-1]]
    names = sorted(set(first) | set(last), key=lambda n: -abs(last.get(n, (0, 0))[1] - first.get(n, (0, 0))[1]))
    print(f"{'op':<52}" + "".join(f"{k + ' n':>12}{k + ' ms':>14}" for k in kinds))
    for n in names[:top]:
        print(f"{n[:51]:<52}" + "".join(f"{tables[k].get(n, (0, 0))[0]:>12}{tables[k].get(n, (0, 0))[1]:>14.2f}" for k in kinds))
    print(f"{'total self CPU ms':<52}" + "".join(f"{'':>12}{sum(v[1] for v in tables[k].values()):>14.2f}" for k in kinds))
    import cProfile
    import pstats

    for kind, fn in fns.items():
        pr = cProfile.Profile()
        pr.enable()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        pr.disable()
        print(f"--- {kind}: Python functions by own time (one train step)")
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)


def build(kind: str, args, device):
    torch.manual_seed(0)
    if kind == "plain":
        net = PlainSearchNetwork(args.C, 10, args.layers)
    else:
        from dsrna import SearchNetwork

        net = SearchNetwork(args.C, 10, args.layers, backend=kind)
    return net.to(device)


def check(args, device) -> float:
    """Max |logit difference| of plain vs reference with the same weights (same batch statistics)."""
    ref = build("reference", args, device)
    plain = build("plain", args, device)
    copy_weights(plain, ref)
    x = torch.rand(args.batch, 3, args.image, args.image, device=device)
    with torch.no_grad():
        return (ref(x) - plain(x)).abs().max().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image", type=int, default=None, help="image side (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--C", type=int, default=None, help="channels (default 4 on CPU, 16 on CUDA)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--nets", default="plain,reference", help="comma list: plain and/or dsrna backends")
    p.add_argument("--profile", action="store_true", help="also count aten ops, Python calls (and CUDA kernels)")
    p.add_argument("--check", action="store_true", help="check plain == reference with copied weights")
    p.add_argument("--breakdown", choices=("forward", "train"), help="per-op calls and self CPU time of one step")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.image = args.image or (32 if cuda else 8)
    args.C = args.C or (16 if cuda else 4)
    print(f"device={device} ({torch.cuda.get_device_name(device) if cuda else 'cpu'}) torch={torch.__version__} "
          f"threads={torch.get_num_threads()} C={args.C} layers={args.layers} batch={args.batch} image={args.image}")
    if args.check:
        print(f"check: max |plain - reference| logits = {check(args, device):.3g}")
    x = torch.rand(args.batch, 3, args.image, args.image, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    header = f"{'net':<12}{'step':<9}{'ms':>10}"
    if args.profile:
        header += f"{'aten ops':>10}{'py calls':>10}" + (f"{'kernels':>9}" if cuda else "")
    print(header)
    breakdown_steps = {}
    for kind in args.nets.split(","):
        net = build(kind, args, device)
        weights = net.weight_parameters()
        steps = _steps(net, x, y, weights)
        if args.breakdown:
            breakdown_steps[kind] = steps[args.breakdown]
        for step, fn in steps.items():
            ms = median_us(fn, device, args.repeats, args.warmup) / 1e3
            line = f"{kind:<12}{step:<9}{ms:>10.2f}"
            if args.profile:
                aten, calls, kernels = _counts(fn, device)
                line += f"{aten:>10}{calls:>10}" + (f"{kernels:>9}" if cuda else "")
            print(line, flush=True)
    if args.breakdown:
        breakdown(breakdown_steps, device)


if __name__ == "__main__":
    main()
