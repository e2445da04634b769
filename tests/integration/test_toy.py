"""The 2-D lab shows DI* at work: mode coverage without reward, mass moving to rewarded modes with it."""

import json
import subprocess
import sys
from functools import cache

import pytest
import torch

from distar.backbones.sdxl import schedule as sdxl_schedule
from distar.toy import GaussianMixture, ToyConfig, energy_distance, run


@cache
def _run(divergence: str, alpha_rew: float) -> dict:
    return run(ToyConfig(divergence=divergence, alpha_rew=alpha_rew, eval_samples=8000))


@pytest.mark.parametrize("divergence", ["score", "kl"])
def test_without_reward_the_generator_covers_every_mode(divergence):
    m = _run(divergence, 0.0)
    ref = m["mode_mass_reference"]
    for k, (g, r) in enumerate(zip(m["mode_mass_generator"], ref, strict=True)):
        assert 0.6 * r < g < 1.5 * r, f"mode {k}: generator mass {g:.3f} vs reference {r:.3f}"
    assert m["off_support_fraction"] < 0.08
    assert m["energy_distance_to_reference"] < 0.05


@pytest.mark.parametrize("divergence", ["score", "kl"])
def test_reward_moves_mass_to_rewarded_modes_and_stays_on_support(divergence):
    plain, rewarded = _run(divergence, 0.0), _run(divergence, 0.2)
    assert rewarded["mean_reward"] > plain["mean_reward"] + 0.05
    assert rewarded["rewarded_mass_generator"] > rewarded["rewarded_mass_reference"] + 0.08
    assert rewarded["off_support_fraction"] < 0.08
    # Not a collapse: the unrewarded modes keep some mass (the divergence holds the generator near p_ref).
    unrewarded = [g for k, g in enumerate(rewarded["mode_mass_generator"]) if k not in (0, 1)]
    assert sum(unrewarded) > 0.25


def test_mixture_eps_is_the_exact_score():
    schedule = sdxl_schedule()
    gm = GaussianMixture.ring(5, 2.0, 0.3, schedule)
    x = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    gm.means, gm.stds, gm.weights = gm.means.double(), gm.stds.double(), gm.weights.double()
    t = torch.randint(0, 1000, (16,))
    a, sigma = schedule.a(t, x), schedule.sigma(t, x)
    (score,) = torch.autograd.grad(gm.log_prob(x, a, sigma).sum(), x)
    torch.testing.assert_close(gm.eps(x, t), -sigma * score)


def test_energy_distance_separates_laws():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert abs(energy_distance(x, y)) < 0.02
    assert energy_distance(x, y + 1.0) > 0.5


def test_cli_writes_metrics_and_picture(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "distar.cli", "toy", "--out", str(out), "--quiet", "steps=20", "assistant_warmup=5"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["steps"] == 20 and len(metrics["mode_mass_generator"]) == 8
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=3", "unknown config key 'stepz'; did you mean 'steps'?"),
        ("steps=many", "config key 'steps': 'many' is not a valid int"),
        ("rewarded_modes=[9]", "rewarded_modes holds 9"),
        ("steps", "is not of the form key=value"),
    ],
)
def test_cli_bad_input_exits_2_with_one_clear_line(tmp_path, override, message):
    cmd = [sys.executable, "-m", "distar.cli", "toy", "--out", str(tmp_path), "--quiet", override]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
