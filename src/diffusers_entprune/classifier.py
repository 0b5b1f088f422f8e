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


@torch.no_grad()
def class_fidelity(pipe, classifier: DigitClassifier | None = None, num_samples: int = 1000,
                   guidance_scale: float = 4.0, num_inference_steps: int = 50, seed: int = 0,
                   batch_size: int = 250, **call_kwargs) -> dict:
    """Share of class-conditional samples of ``pipe`` that ``classifier`` assigns to the requested class.

    Classes cycle 0..9 over the samples; one generator seeded with ``seed`` draws all batches in order. The sampling
    settings are returned with the figure, because the figure means nothing without them. ``call_kwargs`` go to the
    pipeline call (e.g. ``sampler="heun"`` for a `SiTPipeline`).
    """
    classifier = classifier or load_digits_classifier()
    num_classes = classifier.config.num_classes
    labels = torch.arange(num_samples) % num_classes
    generator = torch.Generator().manual_seed(seed)
    predictions = []
    for chunk in labels.split(batch_size):
        images = pipe(class_labels=chunk.tolist(), guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, generator=generator, output_type="np",
                      **call_kwargs).images
        predictions.append(classifier.predict(images))
    correct = (torch.cat(predictions) == labels).float()
    return {
        "class_accuracy": correct.mean().item(),
        "per_class_accuracy": [correct[labels == c].mean().item() for c in range(num_classes)],
        "num_samples": num_samples,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "scheduler": type(pipe.scheduler).__name__,
        "seed": seed,
        **call_kwargs,
    }
