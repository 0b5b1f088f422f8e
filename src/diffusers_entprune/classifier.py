"""A small CNN digit classifier: the judge of class fidelity for samples of the embedded models.

It is trained on real images only (both styles of the embedded digits, ``scripts/train_digits_classifier.py``), so
that it measures whether a generated image looks like the requested class, not whether it looks like the
generator's own output. It is a diffusers `ModelMixin`, so it saves and loads with `save_pretrained` /
`from_pretrained` like every other model here.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DigitClassifier(ModelMixin, ConfigMixin):
    """Images in [-1, 1] of shape (N, 3, resolution, resolution) -> class logits of shape (N, num_classes)."""

    @register_to_config
    def __init__(self, num_classes: int = 10, resolution: int = 32, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.config.resolution, self.config.resolution):
            images = F.interpolate(images, size=(self.config.resolution,) * 2, mode="bilinear", align_corners=False)
        return self.head(self.features(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids for images in [-1, 1] (N, 3, H, W) or for numpy images in [0, 1] (N, H, W, 3)."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(images).permute(0, 3, 1, 2) * 2.0 - 1.0
        self.eval()
        images = images.to(device=self.device, dtype=self.dtype)
        return torch.cat([self(chunk).argmax(dim=1) for chunk in images.split(batch_size)]).cpu()


def load_digits_classifier() -> DigitClassifier:
    from .embedded import DIGITS_CLASSIFIER_DIR

    return DigitClassifier.from_pretrained(DIGITS_CLASSIFIER_DIR).eval()
