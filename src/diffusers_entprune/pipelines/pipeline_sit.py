"""`SiTPipeline`: class-conditional sampling from a SiT (a DiT backbone trained as a flow / stochastic interpolant).

Conventions (SiT's linear path): t in [0, 1], t = 0 is noise, t = 1 is data, ``x_t = t * x1 + (1 - t) * x0``; the
transformer receives the raw t and predicts the velocity ``v = x1 - x0`` (its learned-sigma half, if any, is
dropped). diffusers' `FlowMatchEulerDiscreteScheduler` runs in sigma = 1 - t (sigma = 1 is noise) and steps with
``dx/dsigma = -v``; this pipeline feeds it that mapping, on SiT's uniform time grid.

Samplers:
- ``"euler"``: the scheduler's Euler step on ``t = linspace(0, 1, N + 1)`` (SiT's fixed-step ODE Euler).
- ``"heun"``: Heun's predictor-corrector on the same grid (diffusers' Heun flow scheduler cannot take a custom
  grid, so the two evaluations are written here; the last step, into t = 1, is plain Euler as in Heun samplers
  that end at sigma 0).
- ``"sde"``: Euler-Maruyama for ``dx = [v - (x - t v) / 2] dt + sqrt(1 - t) dW``, i.e. SiT's SDE with the
  ``sigma`` diffusion form ``w_t = 1 - t`` and the score ``-(x - t v) / (1 - t)`` written into the drift, on
  ``linspace(0, 1 - last_step_size, N)``, then one noise-free ("mean") step of ``last_step_size`` to t = 1.

Classifier-free guidance: ``v_uncond + guidance_scale * (v_cond - v_uncond)`` on all latent channels, with the
null class ``num_embeds_ada_norm`` (SiT's own code guides only the first 3 channels for reproducibility; the
standard form is used here, as in `DiTPipeline`).
"""

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("euler", "heun", "sde")


class SiTPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL,
                 scheduler: FlowMatchEulerDiscreteScheduler, id2label: dict[int, str] | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if id2label:  # kept in model_index.json, so from_pretrained hands the names back
            self.register_to_config(id2label={int(k): v for k, v in id2label.items()})
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names (from ``id2label``) -> class ids."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"Unknown labels {unknown}; known: {list(self.labels)[:20]}...")
        return [self.labels[name] for name in labels]

    def velocity(self, latents: torch.Tensor, t: float, class_labels: torch.Tensor, guidance_scale: float):
        """The (guided) velocity at time ``t`` (SiT's convention) for ``latents``."""
        guided = guidance_scale > 1
        channels = latents.shape[1]
        model_input = torch.cat([latents, latents]) if guided else latents
        timesteps = torch.full((len(model_input),), float(t), device=latents.device, dtype=latents.dtype)
        out = self.transformer(model_input, timestep=timesteps, class_labels=class_labels).sample[:, :channels]
        if guided:
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 50,
                 sampler: str = "euler", last_step_size: float = 0.04, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample one image per class label.

        Args:
            sampler: ``"euler"`` or ``"heun"`` (ODE) or ``"sde"`` (Euler-Maruyama); see the module docstring.
            num_inference_steps: ODE steps; for ``"sde"``, Euler-Maruyama steps before the final mean step.
            last_step_size: the SDE's final noise-free step (SiT's default 0.04).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (no VAE decode).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if sampler == "sde" and not 0 < last_step_size < 1:
            raise ValueError(f"`last_step_size` must lie in (0, 1), got {last_step_size}.")
        config = self.transformer.config
        batch = len(class_labels)
        latents = randn_tensor((batch, config.in_channels, config.sample_size, config.sample_size),
                               generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        labels = torch.tensor(class_labels, device=self._execution_device).reshape(-1)
        if guidance_scale > 1:
            labels = torch.cat([labels, torch.full_like(labels, int(config.num_embeds_ada_norm))])

        if sampler == "sde":
            latents = self._sample_sde(latents, labels, guidance_scale, num_inference_steps, last_step_size,
                                       generator)
        else:
            # sigma = 1 - t on SiT's uniform grid; the scheduler appends the terminal sigma 0 (t = 1)
            grid = torch.linspace(0, 1, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(sigmas=(1 - grid).tolist(), device=self._execution_device)
            sigmas = self.scheduler.sigmas
            for i, _ in enumerate(self.progress_bar(self.scheduler.timesteps)):
                t = 1 - sigmas[i].item()
                v = self.velocity(latents, t, labels, guidance_scale)
                if sampler == "heun" and sigmas[i + 1] > 0:  # corrector with the velocity at the step's end
                    h = (sigmas[i] - sigmas[i + 1]).item()
                    predicted = latents + h * v
                    v = 0.5 * (v + self.velocity(predicted, t + h, labels, guidance_scale))
                latents = self.scheduler.step(-v, self.scheduler.timesteps[i], latents).prev_sample

        if output_type == "latent":
            images = latents
        else:
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _sample_sde(self, x, labels, guidance_scale, steps, last_step_size, generator):
        times = torch.linspace(0, 1 - last_step_size, steps + 1)

        def drift(x, t):
            v = self.velocity(x, t, labels, guidance_scale)
            return v - 0.5 * (x - t * v)  # v + w_t / 2 * score, with w_t = 1 - t and score = -(x - t v) / (1 - t)

        for i in self.progress_bar(range(steps)):
            t, dt = times[i].item(), (times[i + 1] - times[i]).item()
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift(x, t) * dt + (1 - t) ** 0.5 * dt ** 0.5 * noise
        return x + drift(x, times[-1].item()) * last_step_size  # the final mean step, no noise
