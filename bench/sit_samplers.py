"""SiTPipeline's samplers against SiT's own sampling code (github willisma/SiT, ``transport/``), one-off.

CI cannot download SiT, so tests/test_pipeline_sit.py checks the samplers against independent references of the
equations; this script checks them against SiT's code itself. It needs a checkout of SiT's ``transport/`` package
(pure torch + torchdiffeq; SiT's ``models.py`` is not used):

    git clone https://github.com/willisma/SiT /tmp/sit    # or any snapshot that has transport/
    python bench/sit_samplers.py --sit_dir /tmp/sit --output_json build/sit-samplers.json

For the embedded tiny SiT (or ``--pretrained_model_name_or_path``), the same initial noise and the same transformer,
it runs each of our samplers and SiT's corresponding one as SiT's ``sample.py`` calls it:

- ``Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method=euler | heun2 | dopri5,
  num_steps=N + 1)`` and ``.sample_sde(diffusion_form="sigma", diffusion_norm=1, last_step="Mean",
  last_step_size=0.04, num_steps=N + 1)`` (``sample.py``'s defaults);
- with classifier-free guidance SiT doubles the batch (``z = cat([z, z])``, ``y = cat([y, null])``) and calls
  ``forward_with_cfg``: guided velocity on the first 3 channels, the conditional one on the rest, for both halves.
  That convention is written below (``SiTForwardWithCFG``) around our transformer; our pipeline runs with
  ``guidance_channels=3``. Without guidance (scale 1) SiT calls the model directly.

SiT's SDE draws its Brownian increments with ``torch.randn``; they are replaced, for the duration of SiT's call, by
the tensors our pipeline drew from its generator (for the doubled batch, both halves get the same draws: the second
half never reaches the output). Reported per setting: the relative difference of the final latents
(``||ours - SiT|| / ||SiT||``) and both model-evaluation counts. For ``dopri5`` also each one's relative error against
a converged solve (torchdiffeq dopri5, atol = rtol = 1e-10, float64 copy of the model).
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_entprune import TINY_SIT_DIR
from diffusers_entprune.pipelines import SiTPipeline

NUM_CHANNELS_GUIDED = 3  # forward_with_cfg in SiT's (and DiT's) models.py


class SiTForwardWithCFG:
    """SiT's model calling convention around a diffusers transformer: ``model(x, t, y)`` (or, guided,
    ``forward_with_cfg(x, t, y, cfg_scale)`` on the doubled batch), velocity channels only; counts calls."""

    def __init__(self, transformer):
        self.transformer = transformer
        self.num_calls = 0

    def forward(self, x, t, y):
        self.num_calls += 1
        return self.transformer(x, timestep=t, class_labels=y).sample[:, : x.shape[1]]

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        guided, rest = out[:, :NUM_CHANNELS_GUIDED], out[:, NUM_CHANNELS_GUIDED:]
        cond, uncond = guided.chunk(2)
        half_guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([half_guided, half_guided]), rest], dim=1)


@contextlib.contextmanager
def replayed_randn(noises, doubled):
    """``torch.randn`` returns the given tensors in order (SiT's SDE increments), duplicated for a doubled batch."""
    queue, original = list(noises), torch.randn

    def randn(*size, **kwargs):
        noise = queue.pop(0)
        return torch.cat([noise, noise]) if doubled else noise

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = original
    if queue:
        raise RuntimeError(f"SiT's SDE used {len(noises) - len(queue)} of {len(noises)} recorded noise draws.")


def pipeline_draws(shape, seed, count, dtype):
    """What SiTPipeline draws from ``generator``: the initial latents, then one tensor per SDE step."""
    generator = torch.Generator().manual_seed(seed)
    return [randn_tensor(shape, generator=generator, dtype=dtype) for _ in range(count)]


def run_sit(sampler, transformer, class_labels, guidance_scale, steps, draws, null_class, sde_noises=()):
    model = SiTForwardWithCFG(transformer)
    guided = guidance_scale > 1
    z, y = draws[0], torch.tensor(class_labels)
    if guided:  # as SiT's sample.py
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, null_class)])
        model_fn, model_kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": guidance_scale}
    else:
        model_fn, model_kwargs = model.forward, {"y": y}
    with torch.no_grad(), replayed_randn(sde_noises, doubled=guided):
        out = sampler(z, model_fn, **model_kwargs)[-1]
    return out[: len(draws[0])], model.num_calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sit_dir", required=True, help="A SiT checkout: the folder that holds transport/.")
    parser.add_argument("--pretrained_model_name_or_path", default=TINY_SIT_DIR)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50], help="N: intervals (SiT's num_steps - 1).")
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.sit_dir, "transport", "integrators.py")):
        parser.error(f"--sit_dir {args.sit_dir!r} has no transport/integrators.py; point it at a SiT checkout.")
    torch.set_num_threads(args.num_threads)
    sys.path.insert(0, args.sit_dir)
    from torchdiffeq import odeint
    from transport import Sampler, create_transport  # SiT's own code

    pipe = SiTPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.eval()
    config = transformer.config
    shape = (args.num_images, config.in_channels, config.sample_size, config.sample_size)
    class_labels = [i % 10 for i in range(args.num_images)]
    null_class = int(config.num_embeds_ada_norm)
    sit = Sampler(create_transport("Linear", "velocity"))
    sit_ode = {"euler": "euler", "heun": "heun2", "dopri5": "dopri5"}

    rows = []
    for guidance_scale in args.guidance_scales:
        guidance_channels = NUM_CHANNELS_GUIDED if guidance_scale > 1 else None
        converged = None
        for sampler in ("euler", "heun", "sde", "dopri5"):
            for steps in args.steps if sampler != "dopri5" else [args.steps[0]]:
                draws = pipeline_draws(shape, args.seed, 1 + (steps if sampler == "sde" else 0), torch.float32)
                ours = pipe(class_labels, guidance_scale=guidance_scale, num_inference_steps=steps, sampler=sampler,
                            generator=torch.Generator().manual_seed(args.seed), guidance_channels=guidance_channels,
                            output_type="latent").images
                if sampler == "sde":
                    sit_sampler = sit.sample_sde(sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0,
                                                 last_step="Mean", last_step_size=0.04, num_steps=steps + 1)
                else:
                    sit_sampler = sit.sample_ode(sampling_method=sit_ode[sampler], num_steps=steps + 1)
                theirs, sit_calls = run_sit(sit_sampler, transformer, class_labels, guidance_scale, steps, draws,
                                            null_class, sde_noises=draws[1:])
                row = {"sampler": sampler, "sit_sampler": sit_ode.get(sampler, "sde Euler-Maruyama, sigma, Mean"),
                       "num_inference_steps": steps if sampler != "dopri5" else None, "guidance_scale": guidance_scale,
                       "guidance_channels": guidance_channels,
                       "relative_difference": ((ours - theirs).norm() / theirs.norm()).item(),
                       "num_model_evaluations": pipe.num_model_evaluations, "sit_model_calls": sit_calls}
                if sampler == "dopri5":
                    if converged is None:
                        converged = converged_solve(transformer.double(), draws[0].double(), class_labels,
                                                    guidance_scale, null_class, odeint)
                        transformer.float()
                    row["error_vs_converged"] = ((ours.double() - converged).norm() / converged.norm()).item()
                    row["sit_error_vs_converged"] = ((theirs.double() - converged).norm() / converged.norm()).item()
                rows.append(row)
                print(json.dumps(row))

    header = ("| sampler | SiT's | N | guidance | rel. diff. vs SiT | our evals | SiT's model calls "
              "| vs converged (ours / SiT) |")
    print("\n" + header + "\n|" + "---|" * 8)
    for r in rows:
        converged_text = (f"{r['error_vs_converged']:.2e} / {r['sit_error_vs_converged']:.2e}"
                          if "error_vs_converged" in r else "")
        print(f"| {r['sampler']} | {r['sit_sampler']} | {r['num_inference_steps'] or ''} | {r['guidance_scale']:g}"
              f"{' (3 ch.)' if r['guidance_channels'] else ''} | {r['relative_difference']:.1e} | "
              f"{r['num_model_evaluations']} | {r['sit_model_calls']} | {converged_text} |")
    if args.output_json:
        import subprocess

        sit_commit = subprocess.run(["git", "-C", args.sit_dir, "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or None
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "machine": platform.platform(),
                       "torch": torch.__version__, "sit_commit": sit_commit, "command": " ".join(sys.argv),
                       "rows": rows}, f, indent=2)


def converged_solve(transformer, z, class_labels, guidance_scale, null_class, odeint):
    """The ODE endpoint to ~1e-10 in float64 with our (guidance_channels=3) velocity."""
    model = SiTForwardWithCFG(transformer)
    y = torch.tensor(class_labels)
    if guidance_scale > 1:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, null_class)])

    def f(t, x):
        tt = torch.full((len(x),), t.item(), dtype=x.dtype)
        return model.forward_with_cfg(x, tt, y, guidance_scale) if guidance_scale > 1 else model.forward(x, tt, y)

    with torch.no_grad():
        out = odeint(f, z, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", atol=1e-10, rtol=1e-10)
    return out[-1][: len(class_labels)]


if __name__ == "__main__":
    main()
