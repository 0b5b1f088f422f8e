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
- ``"dopri5"``: adaptive Dormand-Prince 5(4) on [0, 1] (SiT's default ODE sampler, there through torchdiffeq),
  written here in plain torch: step size from the embedded 4th-order error estimate, RMS norm over the whole batch,
  ``atol`` / ``rtol`` as in SiT (1e-6 / 1e-3); ``num_inference_steps`` is not used, the tolerances set the cost.
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

SAMPLERS = ("euler", "heun", "dopri5", "sde")

# Dormand-Prince 5(4): nodes, stage coefficients, 5th-order weights (also the last stage row: "first same as last")
# and the 5th-minus-4th-order weights that estimate the local error.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))


class SiTPipeline(DiffusionPipeline):
    """Class-conditional sampling from a SiT. After a call, ``num_model_evaluations`` holds how many (guided) velocity
    evaluations the sampler made, which is what a sampler costs."""

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: DiTTransformer2DModel, vae: AutoencoderKL,
                 scheduler: FlowMatchEulerDiscreteScheduler, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        if id2label:  # kept in model_index.json, so from_pretrained hands the names back
            self.register_to_config(id2label={int(k): v for k, v in id2label.items()})
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))
        self.num_model_evaluations = 0

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class names (from ``id2label``) -> class ids."""
        labels = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"Unknown labels {unknown}; known: {list(self.labels)[:20]}...")
        return [self.labels[name] for name in labels]

    def velocity(self, latents: torch.Tensor, t: float, class_labels: torch.Tensor, guidance_scale: float):
        """The (guided) velocity at time ``t`` (SiT's convention) for ``latents``."""
        self.num_model_evaluations += 1
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
                 sampler: str = "euler", last_step_size: float = 0.04, atol: float = 1e-6, rtol: float = 1e-3,
                 max_num_steps: int = 10_000, output_type: str = "pil", return_dict: bool = True):
        """Sample one image per class label.

        Args:
            sampler: ``"euler"``, ``"heun"`` or ``"dopri5"`` (ODE) or ``"sde"`` (Euler-Maruyama); see the module
                docstring.
            num_inference_steps: ODE steps; for ``"sde"``, Euler-Maruyama steps before the final mean step; not
                used by ``"dopri5"``.
            last_step_size: the SDE's final noise-free step (SiT's default 0.04).
            atol, rtol: ``"dopri5"``'s absolute and relative error tolerances per step.
            max_num_steps: ``"dopri5"`` gives up (with an error) after this many accepted and rejected steps.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (no VAE decode).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if sampler == "sde" and not 0 < last_step_size < 1:
            raise ValueError(f"`last_step_size` must lie in (0, 1), got {last_step_size}.")
        if sampler == "dopri5" and not (atol > 0 and rtol > 0):
            raise ValueError(f"`atol` and `rtol` must be > 0, got {atol} and {rtol}.")
        if not guidance_scale >= 0:
            raise ValueError(f"`guidance_scale` must be >= 0 (<= 1: no guidance), got {guidance_scale}.")
        config = self.transformer.config
        null_class = int(config.num_embeds_ada_norm)
        outside = [c for c in torch.as_tensor(class_labels).reshape(-1).tolist() if not 0 <= c <= null_class]
        if outside:
            raise ValueError(f"`class_labels` {outside[:5]} are outside the model's classes 0..{null_class - 1} "
                             f"({null_class}: the null class, for unconditional samples).")
        batch = len(class_labels)
        latents = randn_tensor((batch, config.in_channels, config.sample_size, config.sample_size),
                               generator=generator, device=self._execution_device, dtype=self.transformer.dtype)
        labels = torch.tensor(class_labels, device=self._execution_device).reshape(-1)
        if guidance_scale > 1:
            labels = torch.cat([labels, torch.full_like(labels, int(config.num_embeds_ada_norm))])

        self.num_model_evaluations = 0
        if sampler == "sde":
            latents = self._sample_sde(latents, labels, guidance_scale, num_inference_steps, last_step_size,
                                       generator)
        elif sampler == "dopri5":
            latents = self._sample_dopri5(latents, labels, guidance_scale, atol, rtol, max_num_steps)
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

    def _sample_dopri5(self, x, labels, guidance_scale, atol, rtol, max_num_steps):
        def f(x, t):
            return self.velocity(x, t, labels, guidance_scale).float()

        def rms(tensor):
            return tensor.pow(2).mean().sqrt().item()

        dtype, x = x.dtype, x.float()  # the state and the error control run in float32 even for a half model
        t, k1 = 0.0, f(x, 0.0)
        # initial step (Hairer, Norsett & Wanner, II.4): from the sizes of x, f and a trial Euler step
        scale = atol + rtol * x.abs()
        d0, d1 = rms(x / scale), rms(k1 / scale)
        h0 = 0.01 * d0 / d1 if d0 > 1e-5 and d1 > 1e-5 else 1e-6
        d2 = rms((f(x + h0 * k1, h0) - k1) / scale) / h0
        h1 = (0.01 / max(d1, d2)) ** 0.2 if max(d1, d2) > 1e-15 else max(1e-6, h0 * 1e-3)
        h = min(100 * h0, h1, 1.0)
        steps = 0
        with self.progress_bar(total=1000) as progress:
            while t < 1.0:
                if steps >= max_num_steps:
                    raise RuntimeError(f"dopri5 did not reach t = 1 within `max_num_steps`={max_num_steps} steps (at "
                                       f"t = {t:.4f}); loosen `atol`/`rtol` or use sampler='heun'.")
                steps += 1
                last = h >= 1.0 - t
                h = 1.0 - t if last else h
                k = [k1]
                for i in range(1, 7):
                    stage = x + h * sum(a * ki for a, ki in zip(_DP_A[i], k) if a != 0.0)
                    k.append(f(stage, t + _DP_C[i] * h))
                x_new = stage  # the last stage is the 5th-order solution (its row is _DP_B5)
                error = h * sum(e * ki for e, ki in zip(_DP_E, k) if e != 0.0)
                scale = atol + rtol * torch.maximum(x.abs(), x_new.abs())
                error_norm = rms(error / scale)
                if error_norm <= 1.0:  # accept; the last stage's velocity is the next step's first
                    done_before = int(t * 1000)
                    t, x, k1 = 1.0 if last else t + h, x_new, k[6]
                    progress.update(int(min(t, 1.0) * 1000) - done_before)
                factor = 10.0 if error_norm == 0 else min(10.0, max(0.2, 0.9 * error_norm ** -0.2))
                h = h * factor
        return x.to(dtype)
