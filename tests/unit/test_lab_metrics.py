"""The lab's judge metrics and its reward against closed forms, and the reward's bad input."""

from __future__ import annotations

import json

import pytest
import torch

from distar.errors import UserError
from distar.lab import frechet_distance, spread
from distar.rewards.digits import DigitClassifier, DigitReward, digit_of


def _features(n=400, f=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g, dtype=torch.float64) @ torch.randn(f, f, generator=g, dtype=torch.float64)


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift():
    """Equal covariances: the trace term vanishes, FD = ‖Δμ‖²."""
    a = _features()
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-9)


def test_frechet_distance_of_a_doubled_set():
    """b = 2a: μb = 2μa, Σb = 4Σa, so FD = ‖μa‖² + tr(Σa + 4Σa − 2·2Σa) = ‖μa‖² + tr Σa."""
    a = _features(seed=1) + 0.3
    expected = float(a.mean(0).pow(2).sum() + torch.cov(a.T).trace())
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-8)


def test_spread_is_the_mean_within_class_trace():
    a = _features(seed=2)
    labels = torch.arange(len(a)) % 2
    expected = (torch.cov(a[labels == 0].T).trace() + torch.cov(a[labels == 1].T).trace()) / 2
    assert spread(a, labels) == pytest.approx(float(expected), rel=1e-9)


def test_the_reward_reads_the_digit_the_prompt_names():
    assert digit_of("a handwritten digit seven") == 7 and digit_of("Zero, then one") == 1
    with pytest.raises(UserError, match="name a digit"):
        digit_of("a handwritten digit")
    with pytest.raises(UserError, match="seventeen"):
        digit_of("seventeen")  # a word that merely contains one is not one


def test_the_reward_is_the_log_probability_of_the_prompted_digit(tmp_path):
    torch.manual_seed(0)
    net = DigitClassifier(width=8).eval()
    reward = DigitReward(DigitClassifier.load(net.save(tmp_path / "r")))
    images = torch.rand(3, 3, 16, 16)
    scores = reward(images, ["a digit two", "a digit nine", "a digit zero"])
    logp = net(images).log_softmax(-1)
    torch.testing.assert_close(scores, torch.stack([logp[0, 2], logp[1, 9], logp[2, 0]]))
    images.requires_grad_(True)
    reward(images, ["a digit two"] * 3).sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable in the pixels: hackable, as PickScore is
    assert not any(p.requires_grad for p in reward.parameters())


def test_a_classifier_directory_that_is_not_one_is_refused(tmp_path):
    root = DigitClassifier(width=8).save(tmp_path / "r")
    (root / "config.json").write_text(json.dumps({"kind": "clip", "width": 8, "side": 16}))
    with pytest.raises(UserError, match="not a digit classifier"):
        DigitClassifier.load(root)
    (root / "config.json").write_text(json.dumps({"kind": "digit-classifier", "width": 8, "side": 18}))
    with pytest.raises(UserError, match="do not describe"):
        DigitClassifier.load(root)
    (root / "config.json").write_text(json.dumps({"kind": "digit-classifier", "width": 16, "side": 16}))
    with pytest.raises(UserError, match="does not fit"):
        DigitClassifier.load(root)
    with pytest.raises(UserError, match="reward.sources.digits"):
        DigitReward.from_pretrained(None)
