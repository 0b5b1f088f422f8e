"""Feature networks for distribution metrics: images in [0, 1] (N, 3, H, W) -> the features each metric needs.

A network returns a `Features`: ``pooled`` (one vector per image: FID, KID, precision and recall), ``logits`` (class
scores: Inception Score) and ``spatial`` (a flattened slice of a convolutional feature map: sFID), the latter two
``None`` when the network has none. Two networks ship:

- `InceptionFeatures`: the standard FID Inception-v3 (2048-d pool features and its 1008 logits) through
  torchmetrics, which needs torch-fidelity installed (``pip install torch-fidelity``) and downloads the weights,
  or reads them from ``weights_path`` offline. torch-fidelity exposes no spatial map, so no sFID with it.
- `DigitsFeatures`: the embedded digit classifier (trained on real digits only), for the embedded data, where an
  ImageNet network means little and cannot be downloaded: 64-d pooled features, its 10 logits, and as the spatial
  features the first 8 channels of its last 8x8 feature map (512 values), after sFID's use of the first 7
  channels of Inception's mixed_6 map.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    pooled: torch.Tensor
    logits: torch.Tensor | None = None
    spatial: torch.Tensor | None = None


class DigitsFeatures(nn.Module):
    name = "digits-classifier"

    def __init__(self, classifier=None, spatial_channels: int = 8):
        super().__init__()
        from ..classifier import load_digits_classifier

        self.classifier = (classifier or load_digits_classifier()).eval()
        self.spatial_channels = spatial_channels

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        classifier = self.classifier
        images = images.to(device=classifier.device, dtype=classifier.dtype) * 2.0 - 1.0
        size = (classifier.config.resolution,) * 2
        if images.shape[-2:] != size:
            images = nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
        feature_map = classifier.features(images)
        pooled = feature_map.mean(dim=(2, 3))
        return Features(pooled=pooled.float(), logits=classifier.head(pooled).float(),
                        spatial=feature_map[:, : self.spatial_channels].flatten(1).float())


class InceptionFeatures(nn.Module):
    name = "inception-v3-fid"

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        if not _torch_fidelity_available():
            raise ImportError("`feature_network='inception'` needs torch-fidelity: `pip install torch-fidelity` "
                              "(or use feature_network='digits' for the embedded data).")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Features:
        device = next(self.network.parameters()).device
        uint8 = (images.clamp(0, 1) * 255).round().to(device=device, dtype=torch.uint8)
        pooled, logits = self.network(uint8)
        return Features(pooled=pooled.float(), logits=logits.float())


def _torch_fidelity_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_fidelity") is not None


FEATURE_NETWORKS = ("digits", "inception")


def load_feature_network(name: str, weights_path: str | None = None) -> nn.Module:
    """``"digits"`` (the embedded classifier) or ``"inception"`` (FID's Inception-v3; ``weights_path`` for offline)."""
    if name == "digits":
        return DigitsFeatures()
    if name == "inception":
        return InceptionFeatures(weights_path)
    raise ValueError(f"`feature_network` must be one of {FEATURE_NETWORKS}, got {name!r}.")
