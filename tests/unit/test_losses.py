"""The DI* losses against closed forms.

Gaussian generator x0 = μ + s ⊙ z and Gaussian reference x0 ~ N(m, r²): under VP diffusion both stay
Gaussian, x_t ~ N(a μ, a² s² + σ²), so every score is analytic. With the exact generator score as the
assistant, the gradient of the surrogate `generator_loss` must equal the gradient of the true
divergence, which we compute independently (closed form, or Monte Carlo of the divergence's own
definition), within the Monte-Carlo error of both estimates.
"""

import math

import pytest
import torch

from distar.backbones.sdxl import schedule as sdxl_schedule
from distar.diffusion import FlowSchedule
from distar.losses import (
    assistant_loss,
    cfg,
    generator_loss,
    generator_loss_parts,
    guidance_scale,
    score_distance,
    score_distance_grad,
    time_weight,
)

SCHEDULE = sdxl_schedule()
FLOW = FlowSchedule()  # the rectified-flow path: a = 1 − σ, t = σ
DIM = 3
MU0 = torch.tensor([0.5, -0.3, 1.0], dtype=torch.float64)
LOG_S0 = torch.tensor([0.8, 1.2, 0.5], dtype=torch.float64).log()
M_REF = torch.tensor([0.0, 0.2, -0.4], dtype=torch.float64)
R_REF = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)


def _a_sigma(t, schedule=SCHEDULE):
    """a and σ by hand: the VP table read directly, or 1 − σ and σ on the flow path."""
    if schedule is FLOW:
        sig = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
        return 1 - sig, sig
    t = torch.as_tensor(t)
    return SCHEDULE._a[t].reshape(-1, 1), SCHEDULE._sigma[t].reshape(-1, 1)


def _score(x, t, mean0, std0, schedule=SCHEDULE):
    """∇ log N(x; a mean0, a² std0² + σ²): the diffused score of a Gaussian x0 ~ N(mean0, std0²)."""
    a, sig = _a_sigma(t, schedule)
    return -(x - a * mean0) / (a**2 * std0**2 + sig**2)


def _eps_fn(mean0, std0, schedule=SCHEDULE):
    mean0, std0 = mean0.detach(), std0.detach()

    def eps(x_t, t):
        return -_a_sigma(t, schedule)[1] * _score(x_t, t, mean0, std0, schedule)

    return eps


EPS_GENERATOR = _eps_fn(MU0, LOG_S0.exp())
EPS_REFERENCE = _eps_fn(M_REF, R_REF)
NETWORKS = {
    id(SCHEDULE): (EPS_GENERATOR, EPS_REFERENCE),
    id(FLOW): (_eps_fn(MU0, LOG_S0.exp(), FLOW), _eps_fn(M_REF, R_REF, FLOW)),
}


def _surrogate_gradient(t_values, weight_kind, n, chunks, seed, schedule=SCHEDULE, **loss_kwargs):
    """Mean and standard error over `chunks` independent batches of ∇_(μ, log s) generator_loss."""
    eps_generator, eps_reference = NETWORKS[id(schedule)]
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(chunks):
        mu = MU0.clone().requires_grad_(True)
        log_s = LOG_S0.clone().requires_grad_(True)
        z = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        eps = torch.randn(n, DIM, generator=g, dtype=torch.float64)
        t = torch.as_tensor(t_values)[torch.randint(len(t_values), (n,), generator=g)]
        x0 = mu + log_s.exp() * z
        w = None if weight_kind is None else time_weight(schedule, t, weight_kind, x0)
        loss = generator_loss(x0, t, eps, eps_generator, eps_reference, schedule, weight=w, **loss_kwargs)
        grads.append(torch.cat(torch.autograd.grad(loss, (mu, log_s))))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(chunks)


def _true_divergence(mu, log_s, t, distance, huber_c, form, n, g, schedule=SCHEDULE):
    """The score divergence at one t, from its definition: E_{x~π_t} d(s_θ,t(x) − s_ref,t(x)).

    form "sim": π_t = p_{sg(θ),t} (samples from the frozen θ0);  "full": π_t = p_θ,t (reparametrised).
    For l2 the expectation is closed form; for pseudo-Huber it is Monte Carlo with n samples.
    """
    a, sig = _a_sigma([t], schedule)
    s = log_s.exp()
    v_g = a**2 * s**2 + sig**2
    v_r = a**2 * R_REF**2 + sig**2
    if form == "sim":
        mean_x, var_x = a * MU0, (a**2 * LOG_S0.exp() ** 2 + sig**2)
    else:
        mean_x, var_x = a * mu, v_g
    if distance == "l2":
        # y(x) = A x + b per dimension; E[y²] over x ~ N(mean_x, var_x) = (A mean_x + b)² + A² var_x.
        A = -1 / v_g + 1 / v_r
        b = a * mu / v_g - a * M_REF / v_r
        return ((A * mean_x + b) ** 2 + A**2 * var_x).sum()
    xi = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    x = mean_x + var_x.sqrt() * xi
    y = -(x - a * mu) / v_g + (x - a * M_REF) / v_r
    return score_distance(y, "pseudo_huber", huber_c).mean()


def _true_gradient(t_values, weight_kind, distance, huber_c, form, n, chunks, seed, schedule=SCHEDULE):
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(1 if distance == "l2" else chunks):
        mu = MU0.clone().requires_grad_(True)
        log_s = LOG_S0.clone().requires_grad_(True)
        total = 0.0
        for t in t_values:
            w = 1.0 if weight_kind is None else float(time_weight(schedule, torch.tensor([t]), weight_kind, mu[None]))
            divergence = _true_divergence(mu, log_s, t, distance, huber_c, form, n, g, schedule)
            total = total + w * divergence / len(t_values)
        grads.append(torch.cat(torch.autograd.grad(total, (mu, log_s))))
    grads = torch.stack(grads)
    se = grads.std(0) / math.sqrt(len(grads)) if len(grads) > 1 else torch.zeros_like(grads[0])
    return grads.mean(0), se


def _assert_gradients_agree(surrogate, true):
    (g_s, se_s), (g_t, se_t) = surrogate, true
    se = (se_s**2 + se_t**2).sqrt()
    # The check must have power: the estimator's spread is small next to the gradient it estimates.
    assert float(se.norm()) < 0.1 * float(g_t.norm()), (se, g_t)
    assert torch.all((g_s - g_t).abs() <= 4.5 * se + 1e-9), f"surrogate {g_s}\ntrue      {g_t}\nse        {se}"


CASES = [
    # (t values, weighting, distance, huber_c, form)
    ([400], None, "l2", None, "sim"),
    ([400], None, "l2", None, "full"),
    ([150], None, "pseudo_huber", 0.1, "sim"),
    ([400], None, "pseudo_huber", 1.0, "sim"),
    ([750], None, "pseudo_huber", 10.0, "sim"),
    ([400], None, "pseudo_huber", 1.0, "full"),
    ([150], None, "pseudo_huber", 0.3, "full"),
    ([100, 400, 800], "sigma", "pseudo_huber", 1.0, "sim"),
    ([100, 400, 800], "sigma2", "l2", None, "sim"),
]


@pytest.mark.parametrize("t_values, weighting, distance, huber_c, form", CASES)
def test_score_divergence_gradient_matches_the_true_divergence(t_values, weighting, distance, huber_c, form):
    kwargs = dict(divergence="score", distance=distance, form=form)
    if huber_c is not None:
        kwargs["huber_c"] = huber_c
    surrogate = _surrogate_gradient(t_values, weighting, n=20000, chunks=20, seed=1, **kwargs)
    true = _true_gradient(t_values, weighting, distance, huber_c, form, n=50000, chunks=20, seed=2)
    _assert_gradients_agree(surrogate, true)


def _gaussian_kl(mu, log_s, t, schedule=SCHEDULE):
    """KL(p_θ,t ‖ q_t) for the diagonal Gaussians N(a μ, v_g) and N(a m, v_r), closed form."""
    a, sig = _a_sigma([t], schedule)
    v_g = a**2 * log_s.exp() ** 2 + sig**2
    v_r = a**2 * R_REF**2 + sig**2
    return 0.5 * (v_g / v_r - 1 - (v_g / v_r).log() + (a * mu - a * M_REF) ** 2 / v_r).sum()


@pytest.mark.parametrize("t_values", [[150], [400], [100, 400, 800]])
def test_kl_gradient_matches_closed_form_gaussian_kl(t_values):
    surrogate = _surrogate_gradient(t_values, None, n=20000, chunks=20, seed=3, divergence="kl")
    mu = MU0.clone().requires_grad_(True)
    log_s = LOG_S0.clone().requires_grad_(True)
    kl = sum(_gaussian_kl(mu, log_s, t) for t in t_values) / len(t_values)
    true = (torch.cat(torch.autograd.grad(kl, (mu, log_s))), torch.zeros(2 * DIM, dtype=torch.float64))
    _assert_gradients_agree(surrogate, true)


FLOW_CASES = [
    # σ values on the rectified-flow path, near both ends and between
    ([0.5], None, "l2", None, "sim"),
    ([0.98], None, "l2", None, "full"),
    ([0.02], None, "pseudo_huber", 1.0, "sim"),
    ([0.5], None, "pseudo_huber", 1.0, "full"),
    ([0.98], None, "pseudo_huber", 0.3, "sim"),
    ([0.05, 0.5, 0.95], "sigma", "pseudo_huber", 1.0, "sim"),
    ([0.05, 0.5, 0.95], "x0", "l2", None, "sim"),
]


@pytest.mark.parametrize("t_values, weighting, distance, huber_c, form", FLOW_CASES)
def test_score_divergence_gradient_matches_the_true_divergence_on_the_flow_path(
    t_values, weighting, distance, huber_c, form
):
    """The same theorem on x_σ = (1 − σ) x0 + σ ε: the losses see only (a, σ, ε̂, ε), so a = 1 − σ is all that
    changes, and the surrogate still has the exact divergence's gradient."""
    kwargs = dict(divergence="score", distance=distance, form=form)
    if huber_c is not None:
        kwargs["huber_c"] = huber_c
    surrogate = _surrogate_gradient(t_values, weighting, n=20000, chunks=20, seed=5, schedule=FLOW, **kwargs)
    true = _true_gradient(t_values, weighting, distance, huber_c, form, n=50000, chunks=20, seed=6, schedule=FLOW)
    _assert_gradients_agree(surrogate, true)


@pytest.mark.parametrize("t_values", [[0.02], [0.5], [0.98], [0.05, 0.5, 0.95]])
def test_kl_gradient_matches_closed_form_gaussian_kl_on_the_flow_path(t_values):
    surrogate = _surrogate_gradient(t_values, None, n=20000, chunks=20, seed=7, schedule=FLOW, divergence="kl")
    mu = MU0.clone().requires_grad_(True)
    log_s = LOG_S0.clone().requires_grad_(True)
    kl = sum(_gaussian_kl(mu, log_s, t, FLOW) for t in t_values) / len(t_values)
    true = (torch.cat(torch.autograd.grad(kl, (mu, log_s))), torch.zeros(2 * DIM, dtype=torch.float64))
    _assert_gradients_agree(surrogate, true)


def test_score_and_kl_vanish_when_generator_equals_reference():
    g = torch.Generator().manual_seed(4)
    x0 = (M_REF + R_REF * torch.randn(512, DIM, generator=g, dtype=torch.float64)).requires_grad_(True)
    eps = torch.randn(512, DIM, generator=g, dtype=torch.float64)
    t = torch.full((512,), 300)
    for divergence in ("score", "kl"):
        loss = generator_loss(x0, t, eps, EPS_REFERENCE, EPS_REFERENCE, SCHEDULE, divergence=divergence)
        (grad,) = torch.autograd.grad(loss, x0)
        assert float(grad.abs().max()) < 1e-12


def test_distance_and_its_derivative():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(score_distance(y, "l2"), torch.tensor([25.0, 0.0], dtype=torch.float64))
    c = 2.0
    torch.testing.assert_close(
        score_distance(y, "pseudo_huber", c), torch.tensor([math.sqrt(29) - 2, 0.0], dtype=torch.float64)
    )
    for distance in ("l2", "pseudo_huber"):
        yy = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
        (auto,) = torch.autograd.grad(score_distance(yy, distance, c).sum(), yy)
        torch.testing.assert_close(score_distance_grad(yy, distance, c), auto)


def test_cfg_combination():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(cfg(u, c, 7.5), torch.tensor([1.0 + 7.5 * 2.0, 2.0 - 7.5]))
    torch.testing.assert_close(cfg(u, c, 1.0), c)
    torch.testing.assert_close(cfg(u, c, 0.0), u)
    with pytest.raises(ValueError, match="eps_cond"):
        cfg(u, torch.zeros(3), 7.5)


def test_the_conditional_convention_reads_alpha_as_guidance_on_top_of_the_conditional_model():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(cfg(u, c, guidance_scale(0.0, "conditional")), c)  # α = 0: no guidance
    torch.testing.assert_close(cfg(u, c, guidance_scale(0.0, "diffusers")), u)  # α = 0: unconditional
    # ε_c + α(ε_c − ε_∅), written out
    torch.testing.assert_close(cfg(u, c, guidance_scale(7.5, "conditional")), c + 7.5 * (c - u))
    assert guidance_scale(7.5, "diffusers") == 7.5
    with pytest.raises(ValueError, match="cfg_convention"):
        guidance_scale(7.5, "openai")


def _parts(reduction, huber_c, distance="pseudo_huber", divergence="score", form="sim", shape=(4, 2, 3, 3)):
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = torch.tensor([50, 300, 600, 900])[: shape[0]]
    parts = generator_loss_parts(
        x0, t, eps, lambda x, tt: 0.9 * x + 0.1, lambda x, tt: 0.7 * x.pow(2) - 0.2, SCHEDULE,
        divergence=divergence, distance=distance, huber_c=huber_c, form=form, reduction=reduction,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(parts.loss, x0)
    return parts, grad


@pytest.mark.parametrize("form", ["sim", "full"])
def test_mean_reduction_is_the_sum_with_c_times_root_d_divided_by_root_d(form):
    """√(‖y‖²/D + c²) − c = (√(‖y‖² + D c²) − √D c)/√D: the per-element pseudo-Huber is the summed one with
    c·√D, scaled by 1/√D, in value and gradient."""
    root_d = math.sqrt(2 * 3 * 3)
    mean, grad_mean = _parts("mean", 0.5, form=form)
    total, grad_sum = _parts("sum", 0.5 * root_d, form=form)
    torch.testing.assert_close(mean.divergence, total.divergence / root_d)
    torch.testing.assert_close(grad_mean, grad_sum / root_d)
    torch.testing.assert_close(mean.y_norm, total.y_norm / root_d)


@pytest.mark.parametrize("divergence", ["score", "kl"])
def test_mean_reduction_of_the_l2_distance_is_the_mean_square(divergence):
    mean, grad_mean = _parts("mean", 1.0, distance="l2", divergence=divergence)
    total, grad_sum = _parts("sum", 1.0, distance="l2", divergence=divergence)
    torch.testing.assert_close(mean.divergence, total.divergence / 18)
    torch.testing.assert_close(grad_mean, grad_sum / 18)


def test_y_norm_is_the_norm_of_the_score_gap():
    parts, _ = _parts("sum", 1.0)
    x_t = parts.x_t.detach()
    sigma = SCHEDULE.sigma(torch.tensor([50, 300, 600, 900]), x_t)
    y = -((0.9 * x_t + 0.1) - (0.7 * x_t.pow(2) - 0.2)) / sigma
    torch.testing.assert_close(parts.y_norm, y.flatten(1).norm(dim=1))


def test_x0_weighting_turns_a_score_gap_into_the_gap_of_the_x0_estimates():
    """x̂0 = (x_t − σ ε̂)/a and s = −ε̂/σ, so x̂0_ψ − x̂0_ref = (σ²/a)(s_ψ − s_ref): w = σ²/a."""
    t = torch.tensor([20, 399, 979])
    a, sig = _a_sigma(t)
    torch.testing.assert_close(time_weight(SCHEDULE, t, "x0", torch.zeros(3, DIM)), (sig**2 / a).reshape(-1).float())


def test_assistant_loss_is_minimised_by_the_true_score():
    """Fit ε̂_ψ(x_t) = w x_t + b at one t on Gaussian data: DSM's minimiser is the exact Gaussian denoiser."""
    t_val = 500
    a, sig = (float(v) for v in _a_sigma([t_val]))
    m, r = 1.5, 0.5
    v = a**2 * r**2 + sig**2
    w_true, b_true = sig / v, -sig * a * m / v
    g = torch.Generator().manual_seed(5)
    w = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    t = torch.full((4096,), t_val)
    for step in range(600):
        x0 = m + r * torch.randn(4096, 1, generator=g)
        eps = torch.randn(4096, 1, generator=g)
        x_t = SCHEDULE.add_noise(x0, eps, t)
        loss = assistant_loss(w * x_t + b, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 400:
            for group in opt.param_groups:
                group["lr"] = 0.005
    assert w.item() == pytest.approx(w_true, abs=0.02)
    assert b.item() == pytest.approx(b_true, abs=0.02)
    # And the true denoiser's loss is the irreducible minimum: a²r²/v per dimension.
    x0 = m + r * torch.randn(200000, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(200000, 1, generator=g, dtype=torch.float64)
    x_t = SCHEDULE.add_noise(x0, eps, torch.full((200000,), t_val))
    floor = float(assistant_loss(w_true * x_t + b_true, eps))
    assert floor == pytest.approx(a**2 * r**2 / v, rel=0.02)


def test_assistant_loss_weighting():
    eps_hat = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    eps = torch.zeros(2, 2)
    torch.testing.assert_close(assistant_loss(eps_hat, eps), torch.tensor((1.0 + 2.0) / 2))
    torch.testing.assert_close(assistant_loss(eps_hat, eps, torch.tensor([2.0, 0.0])), torch.tensor(1.0))


def _simple_args(**over):
    x0 = torch.zeros(2, 3, requires_grad=True)
    args = dict(
        x0=x0,
        t=torch.tensor([1, 2]),
        eps=torch.zeros(2, 3),
        eps_assistant=lambda x, t: x,
        eps_reference=lambda x, t: x,
        schedule=SCHEDULE,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(eps=torch.zeros(2, 4)), "eps has shape"),
        (dict(t=torch.tensor([1, 2, 3])), r"^t must have shape"),
        (dict(t=torch.tensor([1, 1000])), r"^t must lie in"),
        (dict(t=torch.tensor([1.0, 2.0])), r"^t must hold integer"),
        (dict(divergence="js"), r"^divergence='js'"),
        (dict(distance="l1"), r"^distance='l1'"),
        (dict(form="half"), r"^form='half'"),
        (dict(huber_c=0.0), r"^huber_c"),
        (dict(weight=torch.ones(3)), r"^weight must have shape"),
        (dict(eps_assistant=lambda x, t: x[:, :2]), r"^eps_assistant must return"),
        (dict(eps_reference=lambda x, t: None), r"^eps_reference must return"),
    ],
)
def test_generator_loss_bad_input_names_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        generator_loss(**_simple_args(**over))


def test_assistant_loss_bad_input():
    with pytest.raises(ValueError, match="eps_hat has shape"):
        assistant_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        assistant_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(5))
    with pytest.raises(ValueError, match="weighting='cosine'"):
        time_weight(SCHEDULE, torch.tensor([1]), "cosine", torch.zeros(1, 2))


def test_cfg_reward_loss_gradient_is_the_scaled_detached_score_gap():
    from distar.losses import cfg_reward_loss

    schedule = sdxl_schedule()
    torch.manual_seed(0)
    x_t = torch.randn(3, 4, 2, 2, requires_grad=True)
    t = torch.tensor([50, 400, 900])
    eps_c, eps_u = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    w = torch.tensor([1.0, 0.5, 2.0])
    cfg_reward_loss(x_t, t, eps_c, eps_u, schedule, 7.5, w).backward()
    sigma = schedule.sigma(t, x_t).detach()
    log_p_c_grad = -(eps_c - eps_u) / sigma  # s(x_t|c) − s(x_t|∅)
    expected = -(7.5 - 1.0) * w.reshape(-1, 1, 1, 1) * log_p_c_grad / 3
    torch.testing.assert_close(x_t.grad, expected)
    x_t.grad = None
    cfg_reward_loss(x_t, t, eps_c, eps_u, schedule, 1.0, w).backward()  # α_cfg = 1: no implicit reward
    assert torch.count_nonzero(x_t.grad) == 0


# -- the whole generator loss L_G -----------------------------------------------------------------


def test_generator_objective_is_the_reward_term_plus_the_divergence_and_the_cfg_term():
    """L_G = −α_rew·r + L_div (+ CFG term): each term's gradient in x0 is its own closed form, and the parts
    are the values `generator_loss_parts` and `cfg_reward_loss` give alone."""
    from distar.losses import cfg_reward_loss, generator_loss_parts, generator_objective

    g = torch.Generator().manual_seed(5)
    n = 64
    x0 = torch.randn(n, DIM, generator=g, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.randint(20, 980, (n,), generator=g)
    weight = time_weight(SCHEDULE, t, "sigma", x0)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    reward = -(x0 - target).pow(2).sum(1)  # ∇_x0 r = −2 (x0 − target)
    alpha = 3.0

    def branches(x_t, tt):  # a conditional and an unconditional Gaussian reference
        return _eps_fn(M_REF * 0, R_REF)(x_t, tt), EPS_REFERENCE(x_t, tt)

    whole = generator_objective(
        x0,
        t,
        eps,
        EPS_GENERATOR,
        EPS_REFERENCE,
        SCHEDULE,
        reward=reward,
        alpha_rew=alpha,
        reference_branches=branches,
        alpha_cfg=4.5,
        weight=weight,
    )
    (grad_whole,) = torch.autograd.grad(whole.loss, x0, retain_graph=True)

    div = generator_loss_parts(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, weight=weight)
    (grad_div,) = torch.autograd.grad(div.loss, x0, retain_graph=True)
    cfg_term = cfg_reward_loss(div.x_t, t, *reversed(branches(div.x_t, t)), SCHEDULE, 4.5, weight)
    (grad_cfg,) = torch.autograd.grad(cfg_term, x0)
    grad_reward = -alpha * (-2 * (x0 - target)) / n  # ∂(−α · mean r)/∂x0

    torch.testing.assert_close(grad_whole, grad_reward.detach() + grad_div + grad_cfg)
    torch.testing.assert_close(whole.reward_loss, -alpha * reward.mean())
    torch.testing.assert_close(whole.divergence_loss, div.loss)
    torch.testing.assert_close(whole.cfg_loss, cfg_term)
    torch.testing.assert_close(whole.loss, whole.reward_loss + div.loss + cfg_term)
    # the logged divergence is w(t)·d(y_t) per sample, y_t the score difference
    a, sigma = _a_sigma(t)
    x_t = a * x0.detach() + sigma * eps
    y = -(EPS_GENERATOR(x_t, t) - EPS_REFERENCE(x_t, t)) / sigma
    torch.testing.assert_close(whole.divergence, weight * score_distance(y))


def test_di_star_out_cfg_term_at_its_own_times_noise_and_weight():
    """DI*-OUT's CFG term drawn apart from the divergence (loss.cfg_t_min/max, cfg_weighting): its gradient in x0
    is the closed form −(α−1)·w'·a(t')·(s_c − s_∅)(x_t')/B at x_t' = a(t')x0 + σ(t')ε', and the divergence's part is
    unchanged."""
    from distar.losses import generator_loss_parts, generator_objective

    g = torch.Generator().manual_seed(9)
    n, scale = 32, 4.5
    x0 = torch.randn(n, DIM, generator=g, dtype=torch.float64).requires_grad_(True)
    eps, eps_cfg = (torch.randn(n, DIM, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.randint(20, 980, (n,), generator=g)
    t_cfg = torch.randint(500, 980, (n,), generator=g)
    weight, w_cfg = time_weight(SCHEDULE, t, "sigma", x0), time_weight(SCHEDULE, t_cfg, "sigma2", x0)
    cond, uncond = _eps_fn(M_REF * 0, R_REF), EPS_REFERENCE

    def branches(x_t, tt):
        return uncond(x_t, tt), cond(x_t, tt)

    kwargs = dict(reference_branches=branches, alpha_cfg=scale, weight=weight)
    own = generator_objective(x0, t, eps, EPS_GENERATOR, cond, SCHEDULE, cfg_noise=(t_cfg, eps_cfg, w_cfg), **kwargs)
    div = generator_loss_parts(x0, t, eps, EPS_GENERATOR, cond, SCHEDULE, weight=weight)
    (grad_own,) = torch.autograd.grad(own.cfg_loss, x0)
    a, sigma = _a_sigma(t_cfg)
    x_t = a * x0.detach() + sigma * eps_cfg
    score_gap = -(cond(x_t, t_cfg) - uncond(x_t, t_cfg)) / sigma
    torch.testing.assert_close(grad_own, -(scale - 1) * w_cfg[:, None] * a * score_gap / n)
    torch.testing.assert_close(own.divergence_loss, div.loss)
    shared = generator_objective(x0, t, eps, EPS_GENERATOR, cond, SCHEDULE, **kwargs)
    assert not torch.allclose(shared.cfg_loss, own.cfg_loss)  # the default reads the divergence's x_t


def test_generator_objective_without_reward_or_cfg_term_is_the_divergence_alone():
    from distar.losses import generator_objective

    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(8, DIM, generator=g, dtype=torch.float64)
    eps = torch.randn(8, DIM, generator=g, dtype=torch.float64)
    t = torch.randint(20, 980, (8,), generator=g)
    out = generator_objective(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, reward=x0.sum(1), alpha_rew=0.0)
    assert out.cfg_loss is None and float(out.reward_loss) == 0.0
    torch.testing.assert_close(out.loss, generator_loss(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE))


@pytest.mark.parametrize("form", ["sim", "full"])
def test_score_normalisation_divides_each_samples_gradient_by_its_mean_x0_distance(form):
    """SiD's normaliser: with score_normalise, sample i's gradient is the plain score-divergence gradient divided by
    mean|x0_i − x̂0_ref,i| (a constant to autograd), x̂0_ref = (x_t − σ_t ε̂_ref)/a_t computed here independently."""
    g = torch.Generator().manual_seed(8)
    n = 16
    x0 = torch.randn(n, DIM, generator=g, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.randint(20, 980, (n,), generator=g)
    kwargs = dict(form=form, weight=time_weight(SCHEDULE, t, "sigma", x0))
    (plain,) = torch.autograd.grad(generator_loss(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, **kwargs), x0)
    normalised = generator_loss(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, score_normalise=True, **kwargs)
    (grad,) = torch.autograd.grad(normalised, x0)
    a, sigma = _a_sigma(t)
    x_t = a * x0.detach() + sigma * eps
    scale = (x0.detach() - (x_t - sigma * EPS_REFERENCE(x_t, t)) / a).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(grad, plain / scale)
    assert not torch.allclose(grad, plain)


def test_kl_normalisation_divides_each_samples_gradient_by_its_mean_x0_distance():
    """DMD's normaliser: with kl_normalise, sample i's gradient is the plain KL gradient / mean|x0_i − x̂0_ref,i|,
    x̂0_ref = (x_t − σ_t ε̂_ref)/a_t computed here independently."""
    g = torch.Generator().manual_seed(7)
    n = 16
    x0 = torch.randn(n, DIM, generator=g, dtype=torch.float64).requires_grad_(True)
    eps = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    t = torch.randint(20, 980, (n,), generator=g)
    kwargs = dict(divergence="kl", weight=time_weight(SCHEDULE, t, "sigma", x0))
    (plain,) = torch.autograd.grad(generator_loss(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, **kwargs), x0)
    normalised = generator_loss(x0, t, eps, EPS_GENERATOR, EPS_REFERENCE, SCHEDULE, kl_normalise=True, **kwargs)
    (grad,) = torch.autograd.grad(normalised, x0)
    a, sigma = _a_sigma(t)
    x_t = a * x0.detach() + sigma * eps
    x0_ref = (x_t - sigma * EPS_REFERENCE(x_t, t)) / a
    scale = (x0.detach() - x0_ref).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(grad, plain / scale)
    assert not torch.allclose(grad, plain)
