"""Every setting of a search run, with the DARTS defaults of METHOD.md §4, and the presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from dsrna.backend import check_name as check_backend_name
from dsrna.errors import changed_settings, check_finite


def _robustness_config_class():
    # Imported on use: the metrics sit above the search space and pull in the bound engine.
    from dsrna.robustness import RobustnessConfig

    return RobustnessConfig


def _default_robustness():
    return _robustness_config_class()()


@dataclass
class SearchConfig:
    """One search run. Field names are the ``dsrna search`` flags with ``-`` read as ``_``."""

    # data
    dataset: str = "mnist-mini"
    data_root: str | None = None
    train_portion: float = 0.5          # weights half / architecture half of the training set
    subset_fractions: tuple[float, float] | None = None  # PC-DARTS ImageNet: per-class (10%, 2.5%) subsets
    num_workers: int = 0                # per loader: the weights' and the architecture's halves each have one
    augment: bool = False               # the data set's training augmentation on both halves
    # super-network
    layers: int = 8
    init_channels: int = 16
    partial_channels: int = 1
    stem: str | None = None             # None: the data set's ("imagenet" for ImageNet, else "cifar")
    backend: str = "auto"
    device: str = "auto"                # auto: the GPU when present (per process under torchrun); cpu, cuda:N
    # schedule
    epochs: int = 50
    batch_size: int = 64                # per process
    max_steps_per_epoch: int | None = None
    order: int = 1                      # 1: first-order DARTS, 2: one unrolled SGD step
    arch_start_epoch: int = 0           # architecture frozen before this epoch (PC-DARTS)
    # weights: SGD with a cosine schedule
    lr: float = 0.025
    lr_min: float = 0.001
    lr_warmup_epochs: int = 0           # linear warm-up from lr/warmup to lr over these epochs
    lr_reference_batch: int | None = None  # scale lr (and lr_min) by global_batch / this when set
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    # architecture: Adam
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    unrolled_radius: float = 0.01       # finite-difference radius r: eps = r / ||v||
    # robustness term of the architecture objective L_val - gamma * R
    robustness: Any = field(default_factory=_default_robustness)
    # run
    amp: str = "none"                   # "none" or "bf16" autocast
    cuda_graph: bool = False            # replay each step from a CUDA graph (one GPU process)
    seed: int = 0
    deterministic: bool = False
    out: str = "runs/search"
    resume: bool = False
    log_every: int = 50
    progress: bool = True
    preset: str | None = None

    # Fields that may differ between a run and its resumption (they do not change the numbers).
    RESUMABLE = ("data_root", "num_workers", "backend", "out", "resume", "log_every", "deterministic", "progress",
                 "cuda_graph", "device")

    def __post_init__(self):
        if self.stem is None:  # 224x224 images through the CIFAR stem would run every cell at full size
            self.stem = "imagenet" if self.dataset == "imagenet" else "cifar"
        check_backend_name(self.backend)
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {self.order}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.layers < 1 or self.init_channels < 1:
            raise ValueError("epochs, batch size, layers and init channels must be positive")
        if self.layers < 3:  # cells layers // 3 and 2 * layers // 3 reduce
            raise ValueError(f"layers must be >= 3, got {self.layers}: with fewer, every cell is a reduction cell and "
                             "the normal cell would come out as its random initialisation")
        if self.log_every < 1:
            raise ValueError(f"log_every must be positive, got {self.log_every}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be positive, got {self.max_steps_per_epoch}")
        if self.partial_channels < 1:
            raise ValueError(f"partial_channels must be >= 1 (1 = plain DARTS), got {self.partial_channels}")
        check_finite("grad_clip", self.grad_clip, positive=True)  # a negative norm would flip every gradient
        check_finite("arch_lr", self.arch_lr, positive=True)
        if not (math.isfinite(self.lr) and self.lr > 0 and math.isfinite(self.lr_min) and 0 <= self.lr_min <= self.lr):
            raise ValueError(f"need finite lr > 0 and 0 <= lr_min <= lr, got lr={self.lr}, lr_min={self.lr_min}")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1 (or unset), got {self.lr_reference_batch}")
        if self.lr_warmup_epochs < 0:
            raise ValueError(f"lr_warmup_epochs must be >= 0, got {self.lr_warmup_epochs}")
        if not 0 <= self.arch_start_epoch < self.epochs:
            raise ValueError(f"arch_start_epoch must be in [0, epochs={self.epochs}) or the architecture is never "
                             f"updated, got {self.arch_start_epoch}")
        if isinstance(self.robustness, dict):
            self.robustness = _robustness_config_class()(**self.robustness)
        self._check_robustness_schedule()
        if self.robustness.dataset != self.dataset:  # R's default budget follows the searched data set
            self.robustness = dataclasses.replace(self.robustness, dataset=self.dataset)
        self.robustness.check_error_symbols()  # R_CB's default method is known now
        self.arch_betas = tuple(self.arch_betas)
        if self.subset_fractions is not None:
            self.subset_fractions = tuple(self.subset_fractions)

    def _check_robustness_schedule(self) -> None:
        """Refuse robustness settings that the run would silently never use."""
        robustness = self.robustness
        if not self.uses_robustness:
            return  # RobustnessConfig refuses every setting of R without R
        if self.order == 2 and robustness.inner_gamma > 0:
            # The unrolled step w' = w - eta grad L_train models the weight step; with R in it the
            # architecture gradient would be that of another objective.
            raise ValueError("inner_gamma (R in the weight step) works with first-order search only: "
                             "the second-order unrolled step assumes plain L_train")
        if robustness.warmup_epochs >= self.epochs:
            raise ValueError(f"robustness warmup_epochs ({robustness.warmup_epochs}) must be below epochs "
                             f"({self.epochs}) or the robustness term is never used")
        if robustness.robust_batch is not None and robustness.robust_batch > self.batch_size:
            raise ValueError(f"robust_batch ({robustness.robust_batch}) is larger than the validation batch "
                             f"(batch_size {self.batch_size}): R is computed on at most the whole batch")

    @property
    def uses_robustness(self) -> bool:
        return self.robustness.kind != "none"

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)  # recurses into the RobustnessConfig dataclass
        return json.loads(json.dumps(data))  # tuples become lists: the plain JSON form

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"search config: unknown field(s) {', '.join(unknown)}")
        robustness = data.get("robustness")
        if isinstance(robustness, dict):
            read = _robustness_config_class().saved_settings(robustness, data.get("dataset", cls.dataset))
            data = {**data, "robustness": read}
        return cls(**data)

    def differences(self, other: "SearchConfig", other_robustness: dict | None = None) -> list[str]:
        """The fields that change the run's numbers and differ from ``other``'s, as
        :func:`dsrna.errors.changed_settings` shows them. R's method, budgets and robust batch are
        compared as they take effect (``other_robustness``: ``other.robustness.in_effect()`` as its
        checkpoint recorded it; None: resolved now), so a setting left to a default that changed
        since differs, and one given explicitly as that default was does not."""
        def numbers(config: SearchConfig, robustness: dict) -> dict:
            data = {k: v for k, v in config.to_dict().items() if k not in self.RESUMABLE}
            data["robustness"] = {**{k: v for k, v in data["robustness"].items() if k not in config.robustness.RESOLVED},
                                  **robustness}
            return data

        before = other.robustness.in_effect() if other_robustness is None else other_robustness
        return changed_settings(numbers(other, before), numbers(self, self.robustness.in_effect()))


# PC-DARTS' ImageNet protocol (Xu et al. 2020): 10% / 2.5% per-class subsets, 224x224 inputs through a
# stride-8 stem, K=2 partial channels, architecture frozen for 35 of 50 epochs, lr 0.5 for a global
# batch of 1024 with 5 warm-up epochs, arch lr 6e-3, random-resized crops and flips. bf16 halves the
# memory of the super-network. 4 loader workers per half: 8 per process.
PRESETS: dict[str, dict[str, Any]] = {
    "imagenet-pcdarts": dict(
        dataset="imagenet", subset_fractions=(0.1, 0.025), partial_channels=2,  # the stem follows the data set
        layers=8, init_channels=16, epochs=50, batch_size=128, arch_start_epoch=35,
        lr=0.5, lr_min=0.0, lr_reference_batch=1024, lr_warmup_epochs=5,
        arch_lr=6e-3, amp="bf16", num_workers=4, augment=True,
    ),
}
