"""SiTPipeline's samplers on a flow whose exact velocity is known in closed form, guidance, save/load."""

import pytest
import torch
from conftest import make_tiny_dit, make_tiny_vae
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin

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
        t = timestep.reshape(-1, 1, 1, 1).to(x.dtype)
        variance = t**2 * S**2 + (1 - t) ** 2
        return Transformer2DModelOutput(sample=MU + (t * S**2 - (1 - t)) / variance * (x - t * MU))


def pipeline():
    return SiTPipeline(transformer=GaussianVelocity().double(), vae=make_tiny_vae(),
                       scheduler=FlowMatchEulerDiscreteScheduler())


def sample(pipe, sampler, steps, n=256, seed=0):
    return pipe(class_labels=[0] * n, guidance_scale=1.0, num_inference_steps=steps, sampler=sampler,
                generator=torch.Generator().manual_seed(seed), output_type="latent").images


def exact_endpoint(n=256, seed=0):
    # the exact ODE flow is affine for Gaussians: x_t = t MU + sqrt(V(t)) z, so x_1 = MU + S z for the same z
    z = torch.randn((n, 4, 4, 4), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + S * z


def test_ode_samplers_converge_to_the_exact_flow_heun_faster_than_euler():
    pipe, exact = pipeline(), exact_endpoint()
    errors = {}
    for sampler in ("euler", "heun"):
        for steps in (10, 20, 40):
            errors[sampler, steps] = (sample(pipe, sampler, steps) - exact).abs().mean().item()
    # measured: Euler 0.0556 / 0.0287 / 0.0146, Heun 0.0074 / 0.0017 / 0.0004 (mean |error| per value)
    assert errors["euler", 10] < 0.06
    for steps in (10, 20):  # first order: twice the steps, half the error; second order: a quarter
        assert errors["euler", steps] / errors["euler", 2 * steps] == pytest.approx(2.0, rel=0.1)
        assert errors["heun", steps] / errors["heun", 2 * steps] == pytest.approx(4.0, rel=0.15)
    assert errors["heun", 20] < errors["euler", 20] / 10


def test_adaptive_dopri5_meets_its_tolerance_and_beats_heun_per_model_evaluation():
    pipe, exact = pipeline(), exact_endpoint()

    def run(**tolerances):
        x = pipe(class_labels=[0] * 256, guidance_scale=1.0, sampler="dopri5", output_type="latent",
                 generator=torch.Generator().manual_seed(0), **tolerances).images
        return (x - exact).abs().mean().item(), pipe.num_model_evaluations

    heun_error, heun_evaluations = (sample(pipe, "heun", 20) - exact).abs().mean().item(), pipe.num_model_evaluations
    assert heun_evaluations == 39  # 19 two-evaluation steps and a final Euler step
    # measured: SiT's tolerances (1e-6 / 1e-3) 0.0038 in 20 evaluations; rtol 1e-4 1.8e-5 in 32; 1e-8 / 1e-6 2e-7 in 74
    loose, loose_evaluations = run()
    tight, tight_evaluations = run(atol=1e-6, rtol=1e-4)
    tighter, tighter_evaluations = run(atol=1e-8, rtol=1e-6)
    assert loose < 0.01 and tight < 1e-4 and tighter < 1e-6
    assert loose_evaluations < tight_evaluations < tighter_evaluations  # the tolerance sets the cost
    assert tight_evaluations < heun_evaluations and tight < heun_error / 20
    with pytest.raises(RuntimeError, match="max_num_steps"):
        run(atol=1e-12, rtol=1e-12, max_num_steps=5)


def test_sde_sampler_reaches_the_data_distribution():
    pipe = pipeline()
    x = sample(pipe, "sde", 250, n=1024)  # 16,384 values per channel
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    # measured: means within 0.009 of MU, stds 0.492-0.499 against 0.5
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
