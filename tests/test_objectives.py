import torch
from conftest import make_scheduler

from diffusers_entprune.objectives import DiffusionObjective


def test_forward_noising_matches_the_scheduler():
    scheduler = make_scheduler()
    objective = DiffusionObjective.from_scheduler(scheduler)
    x0, noise = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 1, 400, 998, 999])
    batch = objective.add_noise(x0, noise, t)
    # float64 cumulative products here, float32 in the scheduler: equal to float32 rounding
    assert torch.allclose(batch.noisy, scheduler.add_noise(x0, noise, t), atol=2e-5)
    assert torch.equal(batch.target, noise)


def test_prediction_splits_off_learned_sigma_channels():
    output = torch.randn(2, 8, 4, 4)
    assert torch.equal(DiffusionObjective.from_scheduler(make_scheduler()).prediction(output), output[:, :4])
    without_sigma = DiffusionObjective.from_scheduler(make_scheduler(), learn_sigma=False)
    assert torch.equal(without_sigma.prediction(output), output)


def test_variational_bound_is_zero_for_the_true_posterior_and_positive_otherwise():
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    x0, noise = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.randn(3, 4, 8, 8, dtype=torch.float64)
    batch = objective.add_noise(x0, noise, torch.tensor([1, 500, 999]))
    posterior_variance = -torch.ones_like(x0)  # v = -1 selects the posterior variance, the true one
    exact = objective.variational_bound(noise, posterior_variance, x0, batch)
    assert torch.allclose(exact, torch.zeros(3, dtype=torch.float64), atol=1e-9)
    assert (objective.variational_bound(noise, torch.ones_like(x0), x0, batch) > 0).all()  # beta_t variance
    assert (objective.variational_bound(noise + 0.1, posterior_variance, x0, batch) > 0).all()  # wrong mean


def test_loss_is_mse_plus_bound_and_the_bound_does_not_train_the_mean():
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    batch = objective.add_noise(x0, noise, torch.tensor([3, 700]))
    output = torch.randn(2, 8, 8, 8, requires_grad=True)
    loss = objective.loss(output, x0, batch)
    mse = ((output[:, :4] - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, mse + objective.variational_bound(output[:, :4], output[:, 4:], x0, batch))
    mse.sum().backward()
    mse_grad = output.grad[:, :4].clone()
    output.grad = None
    loss.sum().backward()
    assert torch.allclose(output.grad[:, :4], mse_grad)  # the mean channels see only the MSE
    assert output.grad[:, 4:].abs().sum() > 0


def test_flow_objective_follows_sit_conventions():
    from diffusers_entprune.objectives import FlowObjective

    objective = FlowObjective(learn_sigma=True)
    x1, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = objective.timesteps_from_fraction(torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64))
    assert t.dtype == torch.float32 and t.tolist() == [0.0, 0.25, 1.0]  # raw t, not x1000
    batch = objective.add_noise(x1, noise, t)
    assert torch.equal(batch.noisy[0], noise[0])  # t = 0 is noise
    assert torch.equal(batch.noisy[2], x1[2])  # t = 1 is data
    assert torch.allclose(batch.noisy[1], 0.25 * x1[1] + 0.75 * noise[1])
    assert torch.equal(batch.target, x1 - noise)  # velocity d x_t / d t
    output = torch.cat([batch.target, torch.randn(3, 4, 8, 8)], dim=1)
    assert torch.equal(objective.prediction(output), batch.target)
    assert torch.equal(objective.loss(output, x1, batch), torch.zeros(3))


def test_ced_runs_on_the_flow_objective():
    from conftest import make_tiny_dit

    from diffusers_entprune.importance import compute_ced
    from diffusers_entprune.models import EntPrunedTransformer2DModel
    from diffusers_entprune.objectives import FlowObjective

    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 4, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g))]
    result = compute_ced(model, FlowObjective(learn_sigma=True), batches, 32)
    assert len(result.scores) == 6 and all(s >= 0 for s in result.scores)
