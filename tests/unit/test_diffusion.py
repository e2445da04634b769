"""The VP schedule and its conversions, against hand computations and diffusers' own scheduler."""

import math

import pytest
import torch

from distar.backbones.sdxl import schedule as sdxl_schedule
from distar.diffusion import VPSchedule


def test_sdxl_schedule_matches_the_scaled_linear_definition():
    s = sdxl_schedule()
    assert s.num_steps == 1000
    betas = [(0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * i / 999) ** 2 for i in range(1000)]
    abar = 1.0
    for i, b in enumerate(betas):
        abar *= 1.0 - b
        if i in (0, 399, 999):
            assert float(s.alphas_cumprod[i]) == pytest.approx(abar, rel=1e-12)


def test_sdxl_schedule_agrees_with_diffusers_scheduler():
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000
    )
    ours = sdxl_schedule().alphas_cumprod
    # diffusers computes in float32; ours is float64.
    torch.testing.assert_close(ref.alphas_cumprod.double(), ours, rtol=1e-5, atol=1e-6)


def test_a_and_sigma_broadcast_and_satisfy_vp_identity():
    s = sdxl_schedule()
    x = torch.zeros(3, 4, 5, 5)
    t = torch.tensor([0, 399, 999])
    a, sig = s.a(t, x), s.sigma(t, x)
    assert a.shape == (3, 1, 1, 1) and sig.shape == (3, 1, 1, 1)
    torch.testing.assert_close(a**2 + sig**2, torch.ones_like(a))
    assert float(sig[1]) == pytest.approx(math.sqrt(1 - float(s.alphas_cumprod[399])), rel=1e-6)


def test_conversions_are_mutually_inverse_and_match_hand_formulas():
    g = torch.Generator().manual_seed(0)
    s = sdxl_schedule()
    x0 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 250, 600, 990])
    x_t = s.add_noise(x0, eps, t)
    a = s.alphas_cumprod[t].sqrt().reshape(4, 1, 1)
    sig = (1 - s.alphas_cumprod[t]).sqrt().reshape(4, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + sig * eps)
    torch.testing.assert_close(s.eps_to_x0(x_t, eps, t), x0)
    torch.testing.assert_close(s.x0_to_eps(x_t, x0, t), eps)
    score = s.eps_to_score(eps, t)
    torch.testing.assert_close(score, -eps / sig)
    torch.testing.assert_close(s.score_to_eps(score, t), eps)
    torch.testing.assert_close(s.kernel_score(eps, t), -(x_t - a * x0) / sig**2)


def test_one_step_generator_map_by_hand():
    s = sdxl_schedule()
    z = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    eps_hat = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    abar = float(s.alphas_cumprod[399])
    expected = (z - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
    torch.testing.assert_close(s.one_step_x0(z, eps_hat, 399), expected)


def test_exact_gaussian_denoiser_recovers_the_score():
    """For x0 ~ N(m, r²) the true ε-prediction is σ (x_t − a m)/(a² r² + σ²); its score is the density's."""
    s = sdxl_schedule()
    m, r = 0.7, 0.4
    t = torch.tensor([300])
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64).reshape(7, 1)
    a, sig = float(s._a[300]), float(s._sigma[300])
    v = a**2 * r**2 + sig**2
    eps_true = sig * (x_t - a * m) / v
    score = s.eps_to_score(eps_true, t.expand(7))
    x = x_t.clone().requires_grad_(True)
    logp = (-((x - a * m) ** 2) / (2 * v)).sum()
    (grad,) = torch.autograd.grad(logp, x)
    torch.testing.assert_close(score, grad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([1000]), "t must lie in"),
        (torch.tensor([-1]), "t must lie in"),
        (torch.tensor([0.5]), "integer timesteps"),
    ],
)
def test_bad_timesteps_name_the_argument(bad, match):
    s = sdxl_schedule()
    with pytest.raises(ValueError, match=match):
        s.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), bad)


def test_bad_schedule_and_shapes_raise():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule(torch.ones(2, 2) * 0.5)
    s = VPSchedule(torch.tensor([0.9, 0.5, 0.1]))
    with pytest.raises(ValueError, match="eps has shape"):
        s.add_noise(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch size"):
        s.add_noise(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="t must lie in"):
        s.add_noise(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([3]))


# -- the rectified-flow path (SD3, FLUX.1) ----------------------------------------------------------------------


def test_flow_path_velocity_conversions_by_hand():
    """x_σ = (1 − σ) x0 + σ ε and v = ε − x0: ε̂ = x_σ + (1 − σ) v̂ and x̂0 = x_σ − σ v̂ give back ε and x0, and the
    shared conversions (score, x0 ↔ ε) hold with a = 1 − σ."""
    from distar.diffusion import FlowSchedule

    s = FlowSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 4, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.5, 0.98, 1.0, 0.0], dtype=torch.float64)
    x_t = s.add_noise(x0, eps, t)
    sig = t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sig) * x0 + sig * eps)
    v = eps - x0
    torch.testing.assert_close(s.velocity_to_eps(x_t, v, t), eps)
    torch.testing.assert_close(s.velocity_to_x0(x_t, v, t), x0)
    inner = slice(0, 3)  # away from σ = 0 and 1, where a or σ vanishes
    torch.testing.assert_close(s.eps_to_score(eps[inner], t[inner]), -eps[inner] / sig[inner])
    torch.testing.assert_close(s.eps_to_x0(x_t[inner], eps[inner], t[inner]), x0[inner])
    torch.testing.assert_close(s.x0_to_eps(x_t[inner], x0[inner], t[inner]), eps[inner])
    # one step from pure noise: x0 = z − v̂ at σ = 1; at σ* = 0.5, z − 0.5 v̂
    z, v_hat = eps, torch.randn(5, 4, 4, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(s.one_step_x0(z, v_hat), z - v_hat)
    torch.testing.assert_close(s.one_step_x0(z, v_hat, 0.5), z - 0.5 * v_hat)
    assert s.model_time(torch.tensor([0.25])).item() == 250.0 and FlowSchedule(time_scale=1).model_time(t)[1] == 0.5


def test_the_assistant_loss_on_the_flow_path_is_the_flow_matching_loss():
    """With the flow path's λ(σ) = 1/(1 − σ)², the assistant's ε-unit loss of a velocity prediction v̂ equals
    mean ‖v̂ − (ε − x0)‖² by hand (float32, the trainer's dtype); on the VP path λ = 1 (its ε loss as it is)."""
    from distar.diffusion import FlowSchedule, VPSchedule
    from distar.losses import assistant_loss

    s = FlowSchedule()
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = torch.randn(3, 4, 16, 8, 8, generator=g)
    t = torch.tensor([0.02, 0.3, 0.7, 0.98])
    x_t = s.add_noise(x0, eps, t)
    eps_hat = s.velocity_to_eps(x_t, v_hat, t)
    by_hand = (v_hat - (eps - x0)).pow(2).mean()
    torch.testing.assert_close(assistant_loss(eps_hat, eps, s.matching_weight(t, eps)), by_hand, rtol=1e-4, atol=0)
    unweighted = assistant_loss(eps_hat, eps)
    assert unweighted < 0.5 * by_hand  # the ε loss alone down-weights large σ by (1 − σ)²
    vp = VPSchedule.scaled_linear(1000, 0.00085, 0.012)
    assert torch.equal(vp.matching_weight(torch.tensor([0, 500, 999]), eps[:3]), torch.ones(3))


def test_flow_path_and_shift_agree_with_diffusers_flow_match_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from distar.diffusion import FlowSchedule

    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ours = FlowSchedule(shift=3.0)
    base = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).sigmas.double()
    torch.testing.assert_close(ours.shifted(base), ref.sigmas.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.unshifted(ours.shifted(base)), base)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 1, 16, 8, 8, generator=g)
    ref.set_timesteps(10)
    timestep = ref.timesteps[3:4]
    sigma = ref.sigmas[3:4].double()
    torch.testing.assert_close(ref.scale_noise(x0, timestep, noise), ours.add_noise(x0, noise, sigma).float())
    torch.testing.assert_close(ours.model_time(sigma).float(), timestep)  # SD3 takes σ·1000


@pytest.mark.parametrize("density", ["uniform", "logit_normal"])
def test_flow_sigma_draws_fill_their_range_with_the_density_asked_for(density):
    from distar.diffusion import FlowSchedule

    n, g = 200_000, torch.Generator().manual_seed(2)
    plain = FlowSchedule(density=density, logit_mean=0.3, logit_std=1.2)
    t = plain.sample_t(n, 0.2, 0.8, g)
    assert t.dtype == torch.float64 and float(t.min()) >= 0.2 and float(t.max()) <= 0.8
    normal = torch.distributions.Normal(0.3, 1.2)
    cdf = {  # P(σ ≤ x) on [0.2, 0.8] for the truncated density, closed form
        "uniform": lambda x: (x - 0.2) / 0.6,
        "logit_normal": lambda x: (
            (normal.cdf(torch.tensor(x).logit()) - normal.cdf(torch.tensor(0.2).logit()))
            / (normal.cdf(torch.tensor(0.8).logit()) - normal.cdf(torch.tensor(0.2).logit()))
        ),
    }[density]
    for x in (0.3, 0.5, 0.7):
        assert float((t <= x).double().mean()) == pytest.approx(float(cdf(x)), abs=4e-3)
    shifted = FlowSchedule(shift=3.0, density=density, logit_mean=0.3, logit_std=1.2).sample_t(n, 0.2, 0.8, g)
    assert float(shifted.min()) >= 0.2 and float(shifted.max()) <= 0.8
    # the shift moves mass towards noise: P(σ ≤ x) under the shift = P(base ≤ unshifted(x)) in the base's
    # truncation to the pre-image of [0.2, 0.8]
    s = FlowSchedule(shift=3.0)
    lo, hi = s.unshifted(torch.tensor(0.2)), s.unshifted(torch.tensor(0.8))
    x = s.unshifted(torch.tensor(0.5))
    if density == "uniform":
        expected = (x - lo) / (hi - lo)
    else:
        expected = (normal.cdf(x.logit()) - normal.cdf(lo.logit())) / (normal.cdf(hi.logit()) - normal.cdf(lo.logit()))
    assert float((shifted <= 0.5).double().mean()) == pytest.approx(float(expected), abs=4e-3)


@pytest.mark.parametrize(
    "bad, match",
    [(torch.tensor([1, 2]), "floating"), (torch.tensor([0.5, 1.2]), r"\[0, 1\]"), (torch.tensor([-0.1]), r"\[0, 1\]")],
)
def test_bad_flow_times_name_the_argument(bad, match):
    from distar.diffusion import FlowSchedule

    with pytest.raises(ValueError, match=match):
        FlowSchedule().a(bad, torch.zeros(len(bad), 3))
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0)
    with pytest.raises(ValueError, match="lo < hi"):
        FlowSchedule().sample_t(4, 0.9, 0.1, torch.Generator())
