"""Distribution metrics computed from features (see `features.py`), all on the full sets at once.

FID, sFID, KID and the Inception Score are torchmetrics' implementations, fed precomputed features through an
identity feature module (so features are extracted once, in sample order, whatever the number of processes, and
every metric sees the same matrices); torchmetrics' own process sync is off, because the features were gathered
before. KID's and the Inception Score's random subsets are drawn from a seeded generator, leaving the global RNG
alone. Precision and recall (Kynkäänniemi et al., 2019, k-NN manifolds) are not in torchmetrics and are written
here.
"""

import warnings

import torch
from torch import nn

# torchmetrics warns that KID and IS keep all features in memory: they are already in memory here
_KEEPS_FEATURES = "will save all extracted features in buffer"


class _Precomputed(nn.Module):
    """The 'feature network' that torchmetrics calls on features that were already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, fake: torch.Tensor, name: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{name}: features must be (N, D) matrices of one width, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}.")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"{name} needs at least 2 real and 2 generated samples, got {len(real)} and {len(fake)}.")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between Gaussians fitted to two feature sets (the same formula gives sFID on spatial features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check(real, fake, "FID")
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return max(0.0, float(metric.compute()))  # tiny negative values are round-off of an exact 0


def kernel_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID (polynomial-kernel MMD^2, unbiased) as mean and std over ``subsets`` random subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check(real, fake, "KID")
    subset_size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_KEEPS_FEATURES}")
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))) over ``splits`` splits: mean and std."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_KEEPS_FEATURES}")
        metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=min(splits, len(logits)),
                                sync_on_compute=False)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for rows in features.split(chunk):
        distances = torch.cdist(rows, features)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest: the point itself is 0
    return torch.cat(radii)


def _inside_manifold(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    inside = []
    for rows in points.split(chunk):
        inside.append((torch.cdist(rows, centres) <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019).

    Each set's manifold is the union of balls around its points reaching their k-th nearest neighbour in the same
    set. Precision: the share of generated samples inside the real manifold (are samples realistic?). Recall: the
    share of real samples inside the generated manifold (is the data's variety covered?).
    """
    _check(real, fake, "precision/recall")
    if k < 1 or k >= min(len(real), len(fake)):
        raise ValueError(f"`k` must lie in 1..{min(len(real), len(fake)) - 1} for these sets, got {k}.")
    real, fake = real.double(), fake.double()
    precision = _inside_manifold(fake, real, _kth_neighbour_radii(real, k, chunk), chunk).double().mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
