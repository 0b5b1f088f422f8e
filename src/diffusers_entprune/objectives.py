"""Training objectives and model-output conventions, in one place.

Each objective draws (x_t, t, target) from clean latents and noise (`add_noise`), maps fractions of its time range
to the timesteps the model takes (`timesteps_from_fraction`), names the output channels that are "the prediction"
(`prediction`) and gives the per-sample training loss (`loss`); `Objective` is that interface, as a type.

`DiffusionObjective` is DiT's: DDPM forward noising with the betas of the pipeline's scheduler, epsilon
prediction, and, when the transformer has learned sigma (``out_channels == 2 * in_channels``), the variance
channels trained by the variational bound with the mean detached (Improved DDPM's hybrid loss, as DiT uses it).
`FlowObjective` is SiT's linear interpolant with velocity prediction.
"""

import math
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class NoisedBatch:
    """One draw of the forward process: the model input, its timestep, and the regression target."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class Objective(Protocol):
    """What the pruning code needs of a training objective; `DiffusionObjective` and `FlowObjective` provide it.

    Time is the objective's own: integer DDPM steps for `DiffusionObjective`, ``t`` in [0, 1] for `FlowObjective`.
    Code that must not depend on which (the importance draws, the training loop) draws fractions of the time range
    and converts them with `timesteps_from_fraction`.
    """

    def timesteps_from_fraction(self, fractions: torch.Tensor) -> torch.Tensor:
        """Map fractions of the training time range to the timesteps the model takes.

        Args:
            fractions (`torch.Tensor`): fractions in [0, 1], shape (B,), usually float64.

        Returns:
            `torch.Tensor`: timesteps of shape (B,), in the model's convention.
        """
        ...

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Draw ``batch_size`` timesteps uniformly over the training time range.

        Args:
            batch_size (`int`): how many timesteps.
            generator (`torch.Generator`, *optional*): the generator to draw with.
            device (`torch.device`, *optional*): where to put them.

        Returns:
            `torch.Tensor`: timesteps of shape (B,).
        """
        ...

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, /) -> NoisedBatch:
        """Run the forward process: clean latents and noise at ``timesteps`` -> the model input and its target.

        Args:
            x0 (`torch.Tensor`): clean latents (B, C, H, W) (`FlowObjective` names them ``x1``).
            noise (`torch.Tensor`): standard normal noise of the same shape and dtype.
            timesteps (`torch.Tensor`): timesteps (B,), e.g. from `timesteps_from_fraction`.

        Returns:
            `NoisedBatch`: the noisy input, its timesteps and the regression target.
        """
        ...

    def prediction(self, model_output: torch.Tensor) -> torch.Tensor:
        """The channels of the model output that are "the prediction" (learned-sigma channels split off).

        Args:
            model_output (`torch.Tensor`): the transformer's output (B, C_out, H, W).

        Returns:
            `torch.Tensor`: the prediction (B, C, H, W), compared with `NoisedBatch.target`.
        """
        ...

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, batch: NoisedBatch, /) -> torch.Tensor:
        """The per-sample training loss (arguments by position: the objectives name the clean latents apart).

        Args:
            model_output (`torch.Tensor`): the transformer's output (B, C_out, H, W) for ``batch.noisy``.
            x0 (`torch.Tensor`): the clean latents that ``batch`` was drawn from.
            batch (`NoisedBatch`): the draw of `add_noise`.

        Returns:
            `torch.Tensor`: the loss of each sample, shape (B,).
        """
        ...


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class DiffusionObjective:
    """DDPM objective for DiT-style transformers.

    Args:
        betas: the scheduler's ``betas`` (e.g. ``pipe.scheduler.betas``), shape (T,).
        learn_sigma: whether the model predicts ``[eps, v]`` with ``2 * in_channels`` output channels.
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True):
        betas = betas.to(torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.num_train_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        # log of the posterior variance, with the t=0 value (which is 0) replaced by the t=1 value, as in DDPM.
        self.posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    @classmethod
    def from_scheduler(cls, scheduler, learn_sigma: bool = True) -> "DiffusionObjective":
        return cls(scheduler.betas, learn_sigma=learn_sigma)

    def _take(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        values = table.to(timesteps.device)[timesteps].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device=None):
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)

    def timesteps_from_fraction(self, fractions: torch.Tensor) -> torch.Tensor:
        """Fractions of the training time range in [0, 1] -> integer timesteps 0..T-1."""
        return (fractions * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        abar = self._take(self.alphas_cumprod, timesteps, x0)
        noisy = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
        return NoisedBatch(noisy=noisy, timesteps=timesteps, target=noise)

    def prediction(self, model_output: torch.Tensor) -> torch.Tensor:
        """The channels that are "the prediction" (epsilon); the learned-sigma channels are split off."""
        return model_output.chunk(2, dim=1)[0] if self.learn_sigma else model_output

    def loss(self, model_output: torch.Tensor, x0: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """Per-sample loss: eps MSE, plus the variational bound for the learned variance (mean detached)."""
        if not self.learn_sigma:
            return ((model_output - batch.target) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        eps, var_values = model_output.chunk(2, dim=1)
        mse = ((eps - batch.target) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        return mse + self.variational_bound(eps.detach(), var_values, x0, batch)

    def variational_bound(self, eps, var_values, x0, batch: NoisedBatch) -> torch.Tensor:
        t, x_t = batch.timesteps, batch.noisy
        abar = self._take(self.alphas_cumprod, t, x0)
        coef1 = self._take(self.posterior_mean_coef1, t, x0)
        coef2 = self._take(self.posterior_mean_coef2, t, x0)
        min_log = self._take(self.posterior_log_variance_clipped, t, x0)
        max_log = self._take(self.betas.log(), t, x0)
        model_log_variance = (var_values + 1) / 2 * max_log + (1 - (var_values + 1) / 2) * min_log

        true_mean = coef1 * x0 + coef2 * x_t
        pred_x0 = (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        model_mean = coef1 * pred_x0 + coef2 * x_t
        dims = tuple(range(1, x0.ndim))
        kl = _normal_kl(true_mean, min_log, model_mean, model_log_variance).mean(dim=dims) / math.log(2.0)
        # At t = 0 the bound is the decoder likelihood. DiT discretises pixels into 256 bins; latents are
        # continuous, so we use the continuous Gaussian negative log-likelihood of x0 instead.
        squared = (x0 - model_mean) ** 2 * torch.exp(-model_log_variance)
        nll = 0.5 * (math.log(2 * math.pi) + model_log_variance + squared)
        nll = nll.mean(dim=dims) / math.log(2.0)
        return torch.where(t == 0, nll, kl) * (self.num_train_timesteps / 1000.0)


class FlowObjective:
    """SiT's linear interpolant (flow matching) objective.

    Time ``t`` in [0, 1] with t = 0 noise and t = 1 data: ``x_t = t * x1 + (1 - t) * x0`` (x1 the clean latents,
    x0 Gaussian noise); the model receives raw ``t`` and predicts the velocity ``x1 - x0``. With learned sigma
    (SiT checkpoints keep DiT's 2x output channels) the second half of the output is ignored, as SiT does.
    """

    def __init__(self, learn_sigma: bool = False):
        self.learn_sigma = learn_sigma

    def timesteps_from_fraction(self, fractions: torch.Tensor) -> torch.Tensor:
        return fractions.to(torch.float32)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device=None):
        return torch.rand(batch_size, generator=generator, device=device)

    def add_noise(self, x1: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> NoisedBatch:
        t = timesteps.to(x1.dtype).view(-1, *([1] * (x1.ndim - 1)))
        return NoisedBatch(noisy=t * x1 + (1 - t) * noise, timesteps=timesteps, target=x1 - noise)

    def prediction(self, model_output: torch.Tensor) -> torch.Tensor:
        return model_output.chunk(2, dim=1)[0] if self.learn_sigma else model_output

    def loss(self, model_output: torch.Tensor, x1: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """Per-sample velocity MSE."""
        return ((self.prediction(model_output) - batch.target) ** 2).mean(dim=tuple(range(1, x1.ndim)))
