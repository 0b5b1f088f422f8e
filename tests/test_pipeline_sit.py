"""SiTPipeline's samplers on a flow whose exact velocity is known in closed form, against independent reference
implementations of SiT's samplers (github willisma/SiT ``transport/``), guidance, save/load."""

import json

import pytest
import torch
from conftest import make_tiny_dit, make_tiny_vae
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torchdiffeq import odeint

from diffusers_entprune.pipelines import SiTPipeline

MU = torch.tensor([1.5, -0.5, 0.25, 2.0], dtype=torch.float64).reshape(1, 4, 1, 1)  # per-channel data mean
S = 0.5  # data std


class GaussianVelocity(ModelMixin, ConfigMixin):
    """The exact velocity of SiT's linear path from N(0, 1) noise to N(MU, S^2) data:
    v(x, t) = MU + (t S^2 - (1 - t)) / V(t) * (x - t MU), V(t) = t^2 S^2 + (1 - t)^2."""

    @register_to_config
    def __init__(self, in_channels=4, sample_size=4, num_embeds_ada_norm=1000, out_channels=4):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and a dtype

    def forward(self, x, timestep, class_labels):
        return Transformer2DModelOutput(sample=exact_velocity(x, timestep.reshape(-1, 1, 1, 1).to(x.dtype)))


def exact_velocity(x, t):
    variance = t**2 * S**2 + (1 - t) ** 2
    return MU + (t * S**2 - (1 - t)) / variance * (x - t * MU)


def pipeline():
    return SiTPipeline(transformer=GaussianVelocity().double(), vae=make_tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler())


def sample(pipe, sampler, steps, n=256, seed=0):
    return pipe(class_labels=[0] * n, guidance_scale=1.0, num_inference_steps=steps, sampler=sampler,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def relative_error(x, reference):
    return ((x - reference).norm() / reference.norm()).item()


def exact_endpoint(n=256, seed=0):
    # the exact ODE flow is affine for Gaussians: x_t = t MU + sqrt(V(t)) z, so x_1 = MU + S z for the same z
    z = torch.randn((n, 4, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + S * z



# Independent reference implementations of SiT's samplers (the equations, written from transport/ in SiT), on SiT's
# grids (``num_steps`` = N + 1 points, float32 as there), driven by the noise the pipeline draws: its generator gives
# the initial latents first, then one normal tensor per SDE step.

def draws(n, seed, count):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((n, 4, 4, 4), generator=generator, dtype=torch.float64) for _ in range(count)]


def reference_euler(x, steps):
    t = torch.linspace(0, 1, steps + 1).double()
    for i in range(steps):
        x = x + (t[i + 1] - t[i]) * exact_velocity(x, t[i])
    return x


def reference_heun2(x, steps):  # every interval, the last included: Euler predictor, trapezoidal corrector
    t = torch.linspace(0, 1, steps + 1).double()
    for i in range(steps):
        h = t[i + 1] - t[i]
        k1 = exact_velocity(x, t[i])
        k2 = exact_velocity(x + h * k1, t[i + 1])
        x = x + h / 2 * (k1 + k2)
    return x


def reference_euler_maruyama(x, noises, last_step_size=0.04):
    """SiT's sample_sde defaults: Euler-Maruyama, diffusion form "sigma" (w_t = sigma_t = 1 - t), norm 1, score of
    the linear path from the velocity, t in linspace(0, 1 - last_step_size, num_steps), then the "Mean" last step."""
    steps = len(noises)
    t = torch.linspace(0, 1 - last_step_size, steps + 1).double()
    dt = t[1] - t[0]

    def drift(x, t):
        v = exact_velocity(x, t)
        alpha, d_alpha, sigma, d_sigma = t, 1.0, 1 - t, -1.0
        score = (alpha / d_alpha * v - x) / (sigma**2 - alpha / d_alpha * d_sigma * sigma)
        return v + (1 - t) * score

    for i in range(steps):
        x = x + drift(x, t[i]) * dt + torch.sqrt(2 * (1 - t[i])) * noises[i] * torch.sqrt(dt)
    return x + drift(x, t[-1]) * last_step_size


@pytest.mark.parametrize("steps", [1, 7, 25])
def test_fixed_step_samplers_match_independent_references_of_sits_samplers(steps):
    pipe, n = pipeline(), 64
    z, *noises = draws(n, 0, steps + 1)
    references = {"euler": (reference_euler(z, steps), steps), "heun": (reference_heun2(z, steps), 2 * steps),
                  "sde": (reference_euler_maruyama(z, noises), steps + 1)}  # SiT itself runs the model 2 (N + 1) times
    for sampler, (reference, evaluations) in references.items():
        x = sample(pipe, sampler, steps, n=n)
        # measured: euler <= 8e-8 (the scheduler's float32 step), heun 0, sde <= 2e-16
        assert relative_error(x, reference) <= 1e-5, sampler
        assert pipe.num_model_evaluations == evaluations, sampler
    # (the old "sde", with half SiT's diffusion in the drift and the noise, and the old "heun", whose last interval was
    # plain Euler, fail this comparison; they encoded the wrong behaviour)


@pytest.mark.parametrize("method, sampler", [("euler", "euler"), ("heun2", "heun")])
def test_fixed_step_samplers_match_torchdiffeq_as_sit_calls_it(method, sampler):
    pipe, steps = pipeline(), 12
    (z,) = draws(256, 0, 1)

    def f(t, x):
        return exact_velocity(x, t)

    reference = odeint(f, z, torch.linspace(0, 1, steps + 1), method=method)[-1]  # SiT's ode.sample
    assert relative_error(sample(pipe, sampler, steps), reference) <= 1e-5


def test_dopri5_is_torchdiffeq_over_sits_grid_and_counts_its_evaluations():
    pipe, (z,) = pipeline(), draws(256, 0, 1)
    calls = []

    def f(t, x):
        calls.append(t)
        return exact_velocity(x, t)

    # SiT: odeint over linspace(t0, t1, num_steps), the last point kept; the pipeline integrates over [0, 1] only
    reference = odeint(f, z, torch.linspace(0, 1, 51, dtype=torch.float64), method="dopri5", atol=1e-6,
                       rtol=1e-3)[-1]
    x = pipe(class_labels=[0] * 256, guidance_scale=1.0, sampler="dopri5", generator=torch.Generator().manual_seed(0),
             output_type="latent").images
    assert torch.equal(x, reference)  # the intermediate output times change nothing (interpolated)
    assert pipe.num_model_evaluations == len(calls) == 26  # 2 to choose the first step, then 6 per step (FSAL)


def test_ode_samplers_converge_to_the_exact_flow_heun_faster_than_euler():
    pipe, exact = pipeline(), exact_endpoint()
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (10, 20, 40, 80):
            errors[sampler, steps] = (sample(pipe, sampler, steps) - exact).abs().mean().item()
    # measured (mean |error| per value): Euler 0.0556 / 0.0287 / 0.0146 / 0.0074, Heun (SiT's heun2, every interval
    # corrected) 0.0014 / 4.1e-4 / 1.1e-4 / 2.8e-5. Heun's ratios approach 4 from below (3.4, 3.7, 3.9), so the
    # second-order check starts at 20 steps (the old test started at 10 with a plain-Euler last step).
    assert errors["euler", 10] < 0.06 and errors["heun", 20] < 5e-4
    for steps in (10, 20):  # first order: twice the steps, half the error
        assert errors["euler", steps] / errors["euler", 2 * steps] == pytest.approx(2.0, rel=0.1)
    for steps in (20, 40):  # second order: a quarter
        assert errors["heun", steps] / errors["heun", 2 * steps] == pytest.approx(4.0, rel=0.1)
    assert errors["heun", 20] < errors["euler", 20] / 50


def test_adaptive_dopri5_meets_its_tolerance_and_the_tolerance_sets_the_cost():
    pipe, exact = pipeline(), exact_endpoint()

    def run(**tolerances):
        x = pipe(class_labels=[0] * 256, guidance_scale=1.0, sampler="dopri5", output_type="latent",
                 generator=torch.Generator().manual_seed(0), **tolerances).images
        return relative_error(x, exact), pipe.num_model_evaluations

    heun_error = relative_error(sample(pipe, "heun", 20), exact)
    assert pipe.num_model_evaluations == 40  # SiT's heun2: 2 per interval (the old 39 had a plain-Euler last step)
    # measured relative L2 errors of torchdiffeq's dopri5: SiT's tolerances (1e-6 / 1e-3) 3.8e-3 in 26 evaluations;
    # rtol 1e-4 6.9e-4 in 32; 1e-8 / 1e-6 8.1e-8 in 68 (Heun, 20 intervals: 4e-4 in 40). A local error control:
    # the global error is a few times rtol.
    loose, loose_evaluations = run()
    tight, tight_evaluations = run(atol=1e-6, rtol=1e-4)
    tighter, tighter_evaluations = run(atol=1e-8, rtol=1e-6)
    assert loose < 10 * 1e-3 and tight < 10 * 1e-4 and tighter < 10 * 1e-6
    assert loose_evaluations < tight_evaluations < tighter_evaluations
    assert tighter < heun_error / 1000
    with pytest.raises(RuntimeError, match="max_num_steps"):
        run(atol=1e-12, rtol=1e-12, max_num_steps=5)


def test_sde_sampler_reaches_the_data_distribution():
    pipe = pipeline()
    x = sample(pipe, "sde", 249, n=1024)  # SiT's default num_steps 250 = 249 Euler-Maruyama steps + the mean step
    assert pipe.num_model_evaluations == 250
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    # measured: means within 0.009 of MU, stds 0.491-0.498 against 0.5 (16,384 values per channel)
    assert torch.allclose(mean, MU.reshape(-1), atol=0.03)
    assert torch.allclose(std, torch.full_like(std, S), atol=0.03)
    exact = exact_endpoint(n=1024)
    assert (x - exact).abs().mean() > 0.05  # stochastic: not the ODE's deterministic endpoint


def test_guidance_combines_conditional_and_null_class_velocities():
    class ByLabel(GaussianVelocity):
        def forward(self, x, timestep, class_labels):  # velocity = the label, the null class 1000 -> 0
            v = torch.where(class_labels == 1000, 0, class_labels).to(x.dtype)
            return Transformer2DModelOutput(sample=v.reshape(-1, 1, 1, 1).expand_as(x))

    pipe = SiTPipeline(transformer=ByLabel().double(), vae=make_tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler())
    x = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    labels = torch.tensor([3, 7, 1000, 1000])
    assert torch.equal(pipe.velocity(x, 0.5, labels, 2.5)[:, 0, 0, 0], torch.tensor([7.5, 17.5], dtype=torch.float64))


def test_save_and_load_keep_a_plain_dit_transformer(tmp_path):
    transformer = make_tiny_dit(num_layers=2)
    pipe = SiTPipeline(transformer=transformer, vae=make_tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(),
                       id2label={0: "zero", 1: "one, uno"})
    expected = pipe(class_labels=[1, 0], num_inference_steps=3, generator=torch.manual_seed(0),
                    output_type="np").images
    pipe.save_pretrained(tmp_path / "sit")
    loaded = SiTPipeline.from_pretrained(tmp_path / "sit")
    assert type(loaded.transformer) is DiTTransformer2DModel
    got = loaded(class_labels=[1, 0], num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
    assert got.shape == (2, 16, 16, 3) and abs(got - expected).max() < 1e-6
    assert loaded.get_label_ids(["uno", "zero"]) == [1, 0]
    with pytest.raises(ValueError, match="sampler"):
        loaded(class_labels=[0], sampler="rk4")


class ByLabel(GaussianVelocity):
    def forward(self, x, timestep, class_labels):  # channel c: (c + 1) * label + x, the null class 1000 -> 0
        label = torch.where(class_labels == 1000, 0, class_labels).to(x.dtype).reshape(-1, 1, 1, 1)
        return Transformer2DModelOutput(sample=label * torch.arange(1, 5, dtype=x.dtype).reshape(1, 4, 1, 1) + x)


def test_guidance_channels_3_guides_the_first_three_channels_like_sits_forward_with_cfg():
    pipe = SiTPipeline(transformer=ByLabel().double(), vae=make_tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler())
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    labels, scale = torch.tensor([3, 7, 1000, 1000]), 2.5
    cond = torch.tensor([3.0, 7.0], dtype=torch.float64).reshape(2, 1, 1, 1) * torch.arange(1, 5).reshape(1, 4, 1, 1)
    cond, uncond = cond + x, x
    guided = uncond + scale * (cond - uncond)
    # SiT's forward_with_cfg: guided eps on channels [:3], the rest from the conditional half
    expected = torch.cat([guided[:, :3], cond[:, 3:]], dim=1)
    assert torch.allclose(pipe.velocity(x, 0.5, labels, scale, guidance_channels=3), expected, rtol=0, atol=1e-12)
    assert torch.allclose(pipe.velocity(x, 0.5, labels, scale), guided, rtol=0, atol=1e-12)  # default: all
    assert torch.equal(pipe.velocity(x, 0.5, labels, scale, 4), pipe.velocity(x, 0.5, labels, scale))

    # through a call: one Euler step from t = 0 to 1 is x0 + v(x0)
    (z,) = draws(2, 5, 1)
    out = pipe(class_labels=[3, 7], guidance_scale=scale, num_inference_steps=1, guidance_channels=3,
               generator=torch.Generator().manual_seed(5), output_type="latent").images
    cond = torch.tensor([3.0, 7.0], dtype=torch.float64).reshape(2, 1, 1, 1) * torch.arange(1, 5).reshape(1, 4, 1, 1)
    cond = cond + z
    guided = z + scale * (cond - z)
    assert relative_error(out, z + torch.cat([guided[:, :3], cond[:, 3:]], dim=1)) < 1e-6  # the scheduler: float32
    assert relative_error(out[:, 3], z[:, 3] + guided[:, 3]) > 0.1  # channel 3 is not guided
    for bad in (0, 5, 2.5):
        with pytest.raises(ValueError, match="guidance_channels"):
            pipe(class_labels=[3], guidance_channels=bad, num_inference_steps=1, output_type="latent")


def test_eval_guidance_channels_is_recorded_for_sit_and_refused_for_dit(tmp_path):
    from diffusers_entprune.cli import main

    common = ["eval", "--num_samples", "4", "--batch_size", "4", "--num_inference_steps", "1", "--latency_repeats",
              "0", "--num_grid_images", "0"]
    with pytest.raises(ValueError, match="--guidance_channels.*SiT"):
        main([*common, "--guidance_channels", "3", "--output_dir", str(tmp_path / "dit")])
    with pytest.raises(ValueError, match="--guidance_channels.*4 latent channels"):
        main([*common, "--model_type", "sit", "--guidance_channels", "5", "--output_dir", str(tmp_path / "five")])
    with pytest.raises(SystemExit):
        main([*common, "--model_type", "sit", "--guidance_channels", "0", "--output_dir", str(tmp_path / "zero")])
    assert not any(tmp_path.iterdir())
    code = main([*common, "--model_type", "sit", "--guidance_channels", "3", "--output_dir", str(tmp_path / "sit")])
    assert code == 0
    sampling = json.load(open(tmp_path / "sit" / "metrics.json"))["sampling"]
    assert (sampling["sampler"], sampling["guidance_channels"]) == ("euler", 3)
