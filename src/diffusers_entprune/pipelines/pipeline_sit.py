"""`SiTPipeline`: class-conditional sampling from a SiT (a DiT backbone trained as a flow / stochastic interpolant).

Conventions (SiT's linear path): t in [0, 1], t = 0 is noise, t = 1 is data, ``x_t = t * x1 + (1 - t) * x0``; the
transformer receives the raw t and predicts the velocity ``v = x1 - x0`` (its learned-sigma half, if any, is
dropped). diffusers' `FlowMatchEulerDiscreteScheduler` runs in sigma = 1 - t (sigma = 1 is noise) and steps with
``dx/dsigma = -v``; this pipeline feeds it that mapping, on SiT's uniform time grid.

Samplers, each the algorithm of SiT's own ``transport/`` code (github willisma/SiT) for the linear path and a
velocity model; ``num_inference_steps = N`` is the number of intervals, SiT's ``num_steps`` is N + 1 grid points:
- ``"euler"``: Euler on ``t = linspace(0, 1, N + 1)`` through the scheduler (SiT's ODE ``euler``); N evaluations.
- ``"heun"``: SiT's ODE ``heun2`` (torchdiffeq's fixed-grid Heun) on the same grid: on every interval, the last one
  included, a predictor ``x + h v(x, t)`` and the trapezoidal corrector ``x + h / 2 (v(x, t) + v(pred, t + h))``;
  2 N evaluations.
- ``"dopri5"``: SiT's default ODE sampler, ``torchdiffeq.odeint(method="dopri5")`` from t = 0 to 1 with
  ``atol`` / ``rtol`` (SiT's 1e-6 / 1e-3); the tolerances set the cost (``num_inference_steps`` is not used: SiT's
  intermediate output times are only interpolated, they change neither the steps nor the endpoint). The state is
  integrated in float32 (float64 for a float64 model).
- ``"sde"``: SiT's default SDE sampler: Euler-Maruyama for ``dx = [v + w_t s] dt + sqrt(2 w_t) dW`` with the
  ``"sigma"`` diffusion ``w_t = 1 - t`` (norm 1) and the score of the linear path from the velocity,
  ``s = (t v - x) / (1 - t)``, so the drift is ``v + t v - x``; N steps on ``linspace(0, 1 - last_step_size, N + 1)``
  (SiT's t0 = 0, t1 = 1 - last_step_size), then the noise-free "Mean" last step ``x + drift * last_step_size`` to
  t = 1. SiT evaluates the model twice per step (once for the velocity term, once inside the score); both are the
  same velocity, so here it is evaluated once per step: N + 1 evaluations (SiT: 2 (N + 1)), same result up to
  rounding.

Classifier-free guidance: ``v_uncond + guidance_scale * (v_cond - v_uncond)`` with the null class
``num_embeds_ada_norm``; by default on all latent channels (diffusers' `DiTPipeline` convention);
``guidance_channels=3`` guides only the first 3 channels and gives the others the conditional velocity, as DiT's
and SiT's own sampling scripts do (``forward_with_cfg``; their published FIDs were measured that way).

``num_model_evaluations`` counts (guided) velocity evaluations, one per batched transformer call.
"""

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("euler", "heun", "dopri5", "sde")


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

    def velocity(self, latents: torch.Tensor, t: float, class_labels: torch.Tensor, guidance_scale: float,
                 guidance_channels: int | None = None):
        """The (guided) velocity at time ``t`` (SiT's convention) for ``latents``; guidance on the first
        ``guidance_channels`` channels (None: all), the other channels take the conditional velocity."""
        self.num_model_evaluations += 1
        guided = guidance_scale > 1
        channels = latents.shape[1]
        model_input = torch.cat([latents, latents]) if guided else latents
        timesteps = torch.full((len(model_input),), float(t), device=latents.device, dtype=latents.dtype)
        out = self.transformer(model_input, timestep=timesteps, class_labels=class_labels).sample[:, :channels]
        if guided:
            cond, uncond = out.chunk(2)
            n = channels if guidance_channels is None else guidance_channels
            out = uncond[:, :n] + guidance_scale * (cond[:, :n] - uncond[:, :n])
            if n < channels:
                out = torch.cat([out, cond[:, n:]], dim=1)
        return out

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 50,
                 sampler: str = "euler", last_step_size: float = 0.04, atol: float = 1e-6, rtol: float = 1e-3,
                 max_num_steps: int = 10_000, guidance_channels: int | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Sample one image per class label.

        Args:
            sampler: ``"euler"``, ``"heun"`` or ``"dopri5"`` (ODE) or ``"sde"`` (Euler-Maruyama); see the module
                docstring.
            num_inference_steps: ODE intervals (SiT's ``num_steps`` - 1); for ``"sde"``, Euler-Maruyama steps
                before the final mean step (SiT's ``num_steps`` - 1 too); not used by ``"dopri5"``.
            last_step_size: the SDE's final noise-free step (SiT's ``last_step_size``, default 0.04).
            atol, rtol: ``"dopri5"``'s absolute and relative error tolerances per step.
            max_num_steps: ``"dopri5"`` gives up (with an error) after this many accepted and rejected steps.
            guidance_channels: guide only the first this many latent channels, the others take the conditional
                velocity (3: DiT's and SiT's own scripts); None (default): all channels, as diffusers does.
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
        if guidance_channels is not None and not (isinstance(guidance_channels, int) and
                                                  1 <= guidance_channels <= config.in_channels):
            raise ValueError(f"`guidance_channels` must be None (all channels) or an integer in 1..{config.in_channels}"
                             f" (the latent channels), got {guidance_channels!r}.")
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

        def velocity(x, t):
            return self.velocity(x, t, labels, guidance_scale, guidance_channels)

        if sampler == "sde":
            latents = self._sample_sde(latents, velocity, num_inference_steps, last_step_size, generator)
        elif sampler == "dopri5":
            latents = self._sample_dopri5(latents, velocity, atol, rtol, max_num_steps)
        elif sampler == "heun":
            latents = self._sample_heun(latents, velocity, num_inference_steps)
        else:
            # sigma = 1 - t on SiT's uniform grid; the scheduler appends the terminal sigma 0 (t = 1)
            grid = torch.linspace(0, 1, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(sigmas=(1 - grid).tolist(), device=self._execution_device)
            sigmas = self.scheduler.sigmas
            for i, _ in enumerate(self.progress_bar(self.scheduler.timesteps)):
                v = velocity(latents, 1 - sigmas[i].item())
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

    def _sample_heun(self, x, velocity, steps):
        """SiT's ``heun2``: predictor and trapezoidal corrector on every interval of ``linspace(0, 1, steps + 1)``."""
        times = torch.linspace(0, 1, steps + 1).tolist()
        for i in self.progress_bar(range(steps)):
            t, t_next = times[i], times[i + 1]
            h = t_next - t
            v = velocity(x, t)
            v_next = velocity(x + h * v, t_next)
            x = x + 0.5 * h * (v + v_next)
        return x

    def _sample_sde(self, x, velocity, steps, last_step_size, generator):
        """SiT's Euler-Maruyama with the "sigma" diffusion (norm 1) and the "Mean" last step."""
        times = torch.linspace(0, 1 - last_step_size, steps + 1)  # SiT's grid: t0 = 0, t1 = 1 - last_step_size
        dt = (times[1] - times[0]).item()  # uniform, as SiT's

        def drift(x, t):
            # v + w_t * score, w_t = 1 - t and score = (t v - x) / (1 - t) on the linear path: v + (t v - x);
            # SiT evaluates the model once for v and once inside the score: the same velocity, computed once here
            v = velocity(x, t)
            return v + (t * v - x)

        for i in self.progress_bar(range(steps)):
            t = times[i].item()
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift(x, t) * dt + (2 * (1 - t)) ** 0.5 * dt ** 0.5 * noise  # sqrt(2 w_t) dW
        return x + drift(x, times[-1].item()) * last_step_size  # the "Mean" last step, no noise

    def _sample_dopri5(self, x, velocity, atol, rtol, max_num_steps):
        """SiT's default ODE sampler: torchdiffeq's dopri5 from t = 0 to t = 1."""
        from torchdiffeq import odeint

        dtype = x.dtype
        state_dtype = torch.promote_types(dtype, torch.float32)  # a half model still integrates in float32

        def f(t, state):
            return velocity(state.to(dtype), t.item()).to(state_dtype)

        # SiT asks for its num_steps grid points; they are only interpolated from the adaptive steps, which do not
        # depend on them, so the endpoint is the same bit for bit with [0, 1] (tested), without the stored path.
        times = torch.tensor([0.0, 1.0], dtype=state_dtype, device=x.device)
        with self.progress_bar(total=1) as progress:
            try:
                path = odeint(f, x.to(state_dtype), times, method="dopri5", atol=atol, rtol=rtol,
                              options={"max_num_steps": max_num_steps})
            except AssertionError as error:
                if "max_num_steps" not in str(error):
                    raise
                raise RuntimeError(f"dopri5 did not reach t = 1 within `max_num_steps`={max_num_steps} steps; "
                                   "loosen `atol`/`rtol` or use sampler='heun'.") from error
            progress.update(1)
        return path[-1].to(dtype)
