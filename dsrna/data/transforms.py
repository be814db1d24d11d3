"""Image pipelines of the data sets. Every pipeline ends with float ``[C, H, W]`` in [0, 1]: there is
no ``Normalize`` here because the models normalise inside, which keeps perturbation budgets in pixel
units."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T


class Cutout:
    """Fill one ``length x length`` square at a uniformly random centre (clipped at the borders) of a
    ``[C, H, W]`` image (DeVries & Taylor 2017; DARTS' final training uses length 16).

    DARTS applies cutout after normalisation with zeros, i.e. it paints the data set's mean colour;
    our images are not normalised yet, so ``fill`` takes that mean explicitly (one value per channel).
    The square's centre is drawn from the global torch generator, like torchvision's random transforms.
    """

    def __init__(self, length: int, fill: Sequence[float] | float = 0.0):
        if length <= 0:
            raise ValueError(f"cutout length must be positive, got {length}")
        self.length = int(length)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        cy = int(torch.randint(height, ()))
        cx = int(torch.randint(width, ()))
        half = self.length // 2
        top, bottom = max(cy - half, 0), min(cy + half, height)
        left, right = max(cx - half, 0), min(cx + half, width)
        image = image.clone()
        image[:, top:bottom, left:right] = self.fill.to(image.dtype)
        return image

    def __repr__(self) -> str:
        return f"Cutout(length={self.length}, fill={self.fill.flatten().tolist()})"


def small_image_augmentation(family: str, image_size: int) -> list:
    """Train-time augmentation of the small-image data sets, applied to ``[C, H, W]`` tensors.

    CIFAR-10: random crop with 4 pixels of zero padding and horizontal flips (the DARTS recipe).
    MNIST family: random crop with 2 pixels of padding, no flips (digits and clothes have a handedness).
    """
    if family == "cifar":
        return [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip()]
    return [T.RandomCrop(image_size, padding=2)]


def imagenet_pipeline(augment: bool) -> T.Compose:
    """The 224-pixel pipelines of DARTS and PC-DARTS on PIL images: RandomResizedCrop, flips and
    colour jitter (brightness, contrast, saturation 0.4, hue 0.2) to train, resize to 256 then centre
    crop to evaluate."""
    if augment:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                          T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2), T.ToTensor()])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
