"""``dsrna search``: the DSRNA architecture search (DARTS with a robustness term); also under torchrun."""

from __future__ import annotations

import argparse
import json
import os
import warnings

HELP = "search a robust cell (DARTS bilevel search, objective L_val - gamma * R); works under torchrun"

# flag -> (SearchConfig field or "robustness.<field>", argparse keywords). Every default is None so
# that a preset supplies the value unless the flag is given.
_FLAGS = {
    "--preset": ("preset", dict(choices=["imagenet-pcdarts"], help="a protocol as one option set (flags given override it)")),
    "--epochs": ("epochs", dict(type=int, help="default 50")),
    "--batch-size": ("batch_size", dict(type=int, help="per process; default 64")),
    "--layers": ("layers", dict(type=int, help="cells in the super-network; default 8")),
    "--init-channels": ("init_channels", dict(type=int, help="C; default 16")),
    "--partial-channels": ("partial_channels", dict(type=int, help="PC-DARTS K (1 = plain DARTS); default 1")),
    "--stem": ("stem", dict(choices=["cifar", "imagenet"], help="imagenet: three stride-2 convs for 224x224 inputs "
                                                               "(default: imagenet on ImageNet, else cifar)")),
    "--order": ("order", dict(type=int, choices=[1, 2], help="1: first order, 2: unrolled second order; default 1")),
    "--arch-start-epoch": ("arch_start_epoch", dict(type=int, help="architecture frozen before this epoch; default 0")),
    "--lr": ("lr", dict(type=float, help="weights' SGD learning rate; default 0.025")),
    "--lr-min": ("lr_min", dict(type=float, help="end of the cosine schedule; default 0.001")),
    "--lr-warmup-epochs": ("lr_warmup_epochs", dict(type=int, help="linear learning-rate warm-up; default 0")),
    "--lr-reference-batch": ("lr_reference_batch", dict(type=int, help="scale --lr by global batch / this (off by default)")),
    "--arch-lr": ("arch_lr", dict(type=float, help="architecture Adam learning rate; default 3e-4")),
    "--robustness": ("robustness.kind", dict(choices=["none", "cb", "jacobian", "combined"],
                                             help="R: none (plain DARTS), cb, jacobian or combined; default none")),
    "--gamma": ("robustness.gamma", dict(type=float, help="weight of R in the architecture loss; default 0.01")),
    "--eps": ("robustness.eps", dict(type=float, help="perturbation budget of R (default: per data set, R_CB's and "
                                                      "R_Jac's apart; docs/bounds.md)")),
    "--norm": ("robustness.norm", dict(choices=["linf", "l2", "l1"], help="norm of the perturbation ball; default linf")),
    # Full CROWN (a backward pass per neuron) ran out of 24 GB on a 3-cell MNIST super-network with the
    # gradient kept: it certifies trained networks (dsrna certify), it does not fit a search step.
    "--method": ("robustness.method", dict(choices=["ibp", "crown-ibp", "crown-symbolic"],
                                              help="bound method of R_CB; default per data set: crown-symbolic "
                                                   "on CIFAR-10, MNIST and Fashion-MNIST, crown-ibp elsewhere (full CROWN is for "
                                                   "dsrna certify: it does not fit a search step)")),
    "--cb-scale": ("robustness.cb_scale", dict(choices=["asinh", "linear"],
                                               help="R_CB averages asinh(bound) (default: finite on vacuous bounds) or the bound")),
    "--bound-dtype": ("robustness.bound_dtype", dict(choices=["float64", "float32"], help="precision of R_CB's bound pass; default float64")),
    "--error-symbols": ("robustness.error_symbols", dict(type=int, help="crown-symbolic's error-symbol budget per robust example "
                                                                        "(only that method reads it); default 2048")),
    "--cb-dither": ("robustness.cb_dither", dict(type=float, help="R_CB bounds its images plus uniform noise of this "
                                                                  "amplitude (pixel units), which breaks the ties of flat "
                                                                  "regions; default 1e-3 (a quarter of an 8-bit level), 0: none")),
    "--estimator": ("robustness.estimator", dict(choices=["random-row", "exact", "top1", "projection"],
                                                 help="Jacobian-norm estimator of R_Jac; default random-row")),
    "--robust-batch": ("robustness.robust_batch", dict(type=int, help="R on the first M validation examples "
                                                                      "(default: all; 2 when R_CB runs crown-symbolic)")),
    "--warmup-epochs": ("robustness.warmup_epochs", dict(type=int, help="epochs searched without R first; default 0")),
    "--inner-gamma": ("robustness.inner_gamma", dict(type=float, help="R's weight in the weight step; default 0 (off)")),
    "--amp": ("amp", dict(choices=["none", "bf16"], help="bf16 autocast of the forward passes; default none")),
    "--seed": ("seed", dict(type=int, help="default 0")),
    "--backend": ("backend", dict(choices=["auto", "reference", "triton", "native"], help="op implementations; default auto")),
    "--device": ("device", dict(help="auto (default: the GPU when present, under torchrun the LOCAL_RANK's), cpu, cuda or cuda:N")),
    "--out": ("out", dict(metavar="DIR", help="run folder; default runs/search")),
    "--max-steps-per-epoch": ("max_steps_per_epoch", dict(type=int, help="cap the steps of every epoch (quick runs)")),
    "--log-every": ("log_every", dict(type=int, help="steps between progress-bar updates (host syncs); default 50")),
    "--num-workers": ("num_workers", dict(type=int, help="data-loading processes per half (weights, architecture); default 0")),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.data import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.set_defaults(dataset=None)  # None: the preset's data set, else mnist-mini
    for flag, (_, kwargs) in _FLAGS.items():
        parser.add_argument(flag, default=None, **kwargs)
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic algorithms (bit-reproducible on CPU; slower on GPU)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="the data set's training augmentation on both halves, as DARTS and PC-DARTS search "
                             "(default: off; on in the imagenet-pcdarts preset)")
    parser.add_argument("--cuda-graph", action="store_true", default=None,
                        help="replay each search step from a CUDA graph (one GPU process; much faster on GPU)")
    parser.add_argument("--resume", action="store_true", default=None, help="continue the run in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The :class:`SearchConfig` of the command line: preset values, overridden by given flags."""
    from dsrna.robustness import RobustnessConfig
    from dsrna.search import PRESETS, SearchConfig

    values = dict(PRESETS[args.preset]) if args.preset else {}
    robustness = {}
    for flag, (field, _) in _FLAGS.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given is None:
            continue
        if field.startswith("robustness."):
            robustness[field.split(".", 1)[1]] = given
        else:
            values[field] = given
    for name in ("dataset", "data_root", "augment", "deterministic", "cuda_graph", "resume", "progress"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return SearchConfig(**values, robustness=RobustnessConfig(**robustness))


def run(args: argparse.Namespace) -> int:
    from dsrna.evaluation.report import write_report
    from dsrna.search import run_search

    config = config_from_args(args)
    first_rank = os.environ.get("RANK", "0") == "0"  # torchrun's rank (the process group comes later)
    if not first_rank:
        # Every rank runs the same code on the same kind of device: rank 0 shows the warnings once.
        # Errors are still printed by every rank, one line each.
        warnings.simplefilter("ignore")
    result = run_search(config)
    if first_rank:  # the process group is gone by now
        write_report(result.out)
        print(f"genotype: {json.dumps(result.genotype.to_dict())}")  # JSON, as dsrna train takes it
        print(f"run folder: {result.out} (genotype.json, log.jsonl, checkpoint.pt, normal.png, reduce.png, "
              "alphas.png, report.html)")
    return 0
