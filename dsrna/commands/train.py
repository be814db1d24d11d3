"""``dsrna train``: train a genotype's network from scratch (DARTS evaluation recipe)."""

from __future__ import annotations

import argparse

HELP = "train a genotype's final network from scratch (DARTS recipe) and write model.pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dsrna.evaluation.train import AMP_CHOICES, LR_SCHEDULES, PRESETS

    parser.add_argument("genotype", nargs="?", default="DARTS_V2",
                        help="genotype.json path, JSON text, or built-in name (DARTS_V1, DARTS_V2, DARTS = DARTS_V2); default DARTS_V2")
    parser.add_argument("--dataset", default="mnist-mini", choices=tuple(PRESETS),
                        help="data set; settings not given come from its preset")
    parser.add_argument("--data-root", default=None, help="folder with the data set (torchvision layout)")
    parser.add_argument("--out", default="runs/train", help="run folder (default runs/train)")
    group = parser.add_argument_group("recipe (unset: the data set's preset, see docs/evaluation.md)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--layers", type=int, help="cells (20 for CIFAR-10)")
    group.add_argument("--init-channels", type=int, help="C (36 for CIFAR-10)")
    group.add_argument("--cutout", type=int, help="cutout square side, 0 = off (16 for CIFAR-10)")
    group.add_argument("--lr", type=float, help="initial SGD learning rate")
    group.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                       help="cosine: annealed to 0 (CIFAR-10); exponential: times 0.97 per epoch (ImageNet)")
    group.add_argument("--stem", choices=("cifar", "imagenet"))
    group.add_argument("--label-smoothing", type=float)
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--weight-decay", type=float, help="3e-4 (3e-5 for ImageNet)")
    group.add_argument("--grad-clip", type=float, default=5.0)
    group.add_argument("--no-auxiliary", dest="auxiliary", action="store_false", help="no auxiliary head")
    group.add_argument("--auxiliary-weight", type=float, default=0.4)
    group.add_argument("--drop-path-prob", type=float, help="final drop-path rate, ramped from 0 (0.2; 0 for ImageNet)")
    parser.add_argument("--amp", default="none", choices=AMP_CHOICES, help="bf16 autocast")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each train step from a CUDA graph (one GPU; much faster on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1...")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="steps between progress-bar loss updates")
    parser.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    parser.add_argument("--eval-limit", type=int, help="evaluate on N test images only: the first N (ImageNet: N evenly spaced, every class alike)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from dsrna.evaluation.train import TrainConfig, train

    fields = set(TrainConfig.__dataclass_fields__) - {"report"}
    result = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    acc = result.metrics["test_acc"]
    print(f"test accuracy {100 * acc:.2f}%, {result.metrics['parameters'] / 1e6:.3f}M parameters")
    print(f"model: {result.model_path}")
    print(f"report: {result.out / 'report.html'}")
    return 0
