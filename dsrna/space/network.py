"""The final network: a genotype's cells stacked and trained from scratch (DARTS evaluation setting)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsrna.space.genotype import Genotype
from dsrna.space.ops import (
    BatchNorm2d,
    FactorizedReduce,
    Identity,
    Normalize,
    ReLUConvBN,
    drop_path,
    make_op,
)


class Cell(nn.Module):
    def __init__(self, genotype: Genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        self.reduction = reduction
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        edges = genotype.reduce if reduction else genotype.normal
        self.concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self.concat)
        self.steps = len(edges) // 2
        self.indices = [index for _, index in edges]
        self.ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and index < 2 else 1, affine=True, pool_bn=False) for name, index in edges
        )

    def forward(self, s0, s1, drop_prob: float = 0.0):
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            node = 0
            for k in (2 * i, 2 * i + 1):
                h = self.ops[k](states[self.indices[k]])
                if self.training and drop_prob > 0 and not isinstance(self.ops[k], Identity):
                    h = drop_path(h, drop_prob)
                node = node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class _AuxiliaryPool(nn.Module):
    """Two 5x5 average windows per side, overlapping to cover the map: DARTS' stride-3 pool on its
    8x8 CIFAR map and stride-2 pool on its 7x7 ImageNet map, the same rule on any map of 6 pixels
    or more. [choice] A smaller map (a small input image) is average-pooled to 2x2."""

    def forward(self, x):
        H, W = x.shape[-2:]
        if min(H, W) < 6:
            return F.adaptive_avg_pool2d(x, 2)
        return F.avg_pool2d(x, 5, stride=(H - 5, W - 5), count_include_pad=False)


class AuxiliaryHead(nn.Module):
    """DARTS' auxiliary classifier after the second reduction, ending in a 2x2 conv on a 2x2 map.
    DARTS' ImageNet head leaves out the batch norm after that conv ("for consistency with the
    experiments in the paper"): ``imagenet=True`` does too (an identity in its place)."""

    def __init__(self, C, num_classes, imagenet: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            _AuxiliaryPool(),
            nn.Conv2d(C, 128, 1, bias=False),
            BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.Identity() if imagenet else BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class Network(nn.Module):
    """The genotype's cell stacked ``layers`` times; reductions at ``layers//3`` and ``2*layers//3``.

    ``stem="cifar"``: 3x3 conv to ``3C`` channels; ``stem="imagenet"``: three stride-2 3x3 convs
    (stride 8 in all), the DARTS mobile setting. In training mode with ``auxiliary=True`` the
    forward returns ``(logits, auxiliary_logits)``; otherwise the logits alone.
    """

    def __init__(self, genotype, C=36, num_classes=10, layers=20, in_channels=3, auxiliary=False,
                 drop_path_prob=0.0, stem="cifar", mean=None, std=None):
        super().__init__()
        if isinstance(genotype, (str, dict)):
            genotype = Genotype.from_dict(genotype) if isinstance(genotype, dict) else Genotype.from_json(genotype)
        genotype = Genotype(*genotype).validate()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.genotype = genotype
        self.layers, self.drop_path_prob = layers, drop_path_prob
        self.normalize = Normalize(mean if mean is not None else [0.0] * in_channels,
                                   std if std is not None else [1.0] * in_channels)
        if stem == "cifar":
            C_curr = 3 * C
            self.stem = nn.Sequential(nn.Conv2d(in_channels, C_curr, 3, padding=1, bias=False), BatchNorm2d(C_curr))
            self.stem1 = None
            C_prev_prev, C_prev = C_curr, C_curr
            reduction_prev = False
        else:
            # s0 comes out at stride 4 and s1 at stride 8; the first cell's FactorizedReduce aligns them.
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), BatchNorm2d(C // 2), nn.ReLU(inplace=False),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), BatchNorm2d(C),
            )
            self.stem1 = nn.Sequential(
                nn.ReLU(inplace=False), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), BatchNorm2d(C),
            )
            C_prev_prev, C_prev = C, C
            reduction_prev = True
        C_curr = C
        self.cells = nn.ModuleList()
        self.auxiliary_head = None
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                C_curr *= 2
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if auxiliary and i == 2 * layers // 3:
                self.auxiliary_head = AuxiliaryHead(C_prev, num_classes, imagenet=stem == "imagenet")
        self.aux_position = 2 * layers // 3
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, x: torch.Tensor):
        s0 = self.stem(self.normalize(x))
        s1 = self.stem1(s0) if self.stem1 is not None else s0
        aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.aux_position and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        logits = self.classifier(self.global_pooling(s1).flatten(1))
        return (logits, aux) if aux is not None else logits


def count_parameters(model: nn.Module, exclude: str = "auxiliary") -> int:
    """Parameter count as DARTS reports it (the auxiliary head left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if exclude not in name)
