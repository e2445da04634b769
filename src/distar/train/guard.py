"""Guardrails: what the optimised reward cannot see, measured on fixed prompts and seeds while training.

Every `log.sample_every` steps the generator draws `guard.seeds` images for each of the first `guard.prompts`
prompts (fixed noise), and the trainer logs under guard/:
- held-out rewards: every reward of `guard.heldout` (not trained on), on the paper's scales;
- diversity: the mean pairwise cosine distance of CLIP image features between the seeds of one prompt;
- drift: simple image statistics (mean saturation, the fractions of near-black and near-white pixels, the share of
  spectral energy in the upper half of the frequencies), beside the divergence the loop already logs.
The first evaluation of a fresh run, on the initial generator, is the baseline ({out}/guard_baseline.json). A guard
breaches when diversity falls below `guard.min_diversity` × the baseline's, or a held-out reward falls below the
baseline by more than `guard.max_heldout_drop[name]`. The newest checkpoint written while no guard was breached
is kept as the run's best (`checkpoints/BEST`, never pruned; `distar export --checkpoint RUN/best`); with
`guard.stop_on_breach` the run stops at the first breach.
"""

from __future__ import annotations

import json
import sys

import torch

from distar import sources, storage
from distar.sources import parse_dtype


def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Mean HSV saturation, fractions of near-black (max channel < 0.05) and near-white (min channel > 0.95)
    pixels, and the share of the image's spectral energy above half the Nyquist frequency, of images in [0, 1]."""
    x = images.float().clamp(0, 1)
    high, low = x.max(dim=1).values, x.min(dim=1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-8), torch.zeros_like(high))
    gray = x.mean(dim=1)
    power = torch.fft.fftshift(torch.fft.fft2(gray - gray.mean(dim=(-2, -1), keepdim=True)), dim=(-2, -1)).abs() ** 2
    h, w = gray.shape[-2:]
    fy = torch.linspace(-1, 1, h).abs().reshape(-1, 1)
    fx = torch.linspace(-1, 1, w).abs().reshape(1, -1)
    upper = (torch.maximum(fy, fx) > 0.5).to(power)
    total = power.sum(dim=(-2, -1)).clamp_min(1e-12)
    return {
        "saturation": saturation.mean().item(),
        "near_black": (high < 0.05).float().mean().item(),
        "near_white": (low > 0.95).float().mean().item(),
        "high_frequency": ((power * upper).sum(dim=(-2, -1)) / total).mean().item(),
    }


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance 1 − cos between the S seeds of each prompt; features (P, S, D), unit norm."""
    p, s, _ = features.shape
    if s < 2:
        raise ValueError("diversity needs at least two seeds per prompt")
    cos = features @ features.transpose(1, 2)  # (P, S, S)
    off_diagonal = ~torch.eye(s, dtype=torch.bool)
    return (1.0 - cos[:, off_diagonal]).mean().item()


def breaches(values: dict[str, float], baseline: dict[str, float], min_diversity: float,
             max_heldout_drop: dict[str, float]) -> list[str]:  # fmt: skip
    """The guards that `values` breach against the baseline, each as a short sentence."""
    out = []
    if min_diversity > 0 and "guard/diversity" in values:
        floor = min_diversity * baseline["guard/diversity"]
        if values["guard/diversity"] < floor:
            out.append(f"diversity {values['guard/diversity']:.4g} < {min_diversity:g} × start {floor:.4g}")
    for name, delta in max_heldout_drop.items():
        key = f"guard/heldout/{name}"
        if key in values and values[key] < baseline[key] - delta:
            out.append(f"held-out {name} {values[key]:.4g} < start {baseline[key]:.4g} − {delta:g}")
    return out


class Guard:
    """The guardrails of one run (rank 0 measures, every rank learns the verdict): the held-out rewards and the
    diversity model, loaded at the first evaluation; the initial generator's values (the baseline)."""

    def __init__(self, config, world, method):
        self.config, self.world, self.method = config, world, method
        self._models = None
        self.baseline: dict[str, float] | None = None
        """The initial generator's guard values (rank 0)."""

    def models(self) -> tuple:
        """(the held-out rewards as one WeightedReward or None, the diversity model or None), loaded once."""
        if self._models is None:
            from distar.rewards import WeightedReward, load_reward

            r, g, m = self.config.reward, self.config.guard, self.config.model
            hub = sources.hub_options(m.cache_dir, m.offline)

            def placed(module):
                return module.to(self.world.device, parse_dtype(r.dtype)).eval()

            heldout = None
            if g.heldout:
                heldout = placed(WeightedReward.from_specs([r.spec(n) for n in g.heldout], dtype=r.dtype, **hub))
            embedder = placed(load_reward(r.spec(g.diversity_model), dtype=r.dtype, **hub)) if g.seeds >= 2 else None
            self._models = (heldout, embedder)
        return self._models

    @torch.no_grad()
    def values(self) -> dict[str, float]:
        """guard/* values of the generator now: held-out rewards, diversity, image statistics (rank 0 only)."""
        g = self.config.guard
        heldout, embedder = self.models()
        images, prompts = self.method.guard_images(g.prompts, max(g.seeds, 1))
        device_images = images.to(self.world.device)
        values = {f"guard/{k}": v for k, v in image_statistics(images).items()}
        if heldout is not None:  # on the paper's scales, as the trained reward
            terms = heldout.terms(device_images, prompts)
            values.update({f"guard/heldout/{name}": v.float().mean().item() for name, v in terms.items()})
        if embedder is not None:
            features = embedder.embed_images(device_images).cpu()
            values["guard/diversity"] = diversity(features.reshape(-1, g.seeds, features.shape[-1]))
        return values

    def measure_baseline(self, fresh: bool) -> dict[str, float]:
        """The initial generator's guard values: measured on a fresh start, read back on resume."""
        fs, path = storage.filesystem(self.config.out)
        where = f"{path.rstrip('/')}/guard_baseline.json"
        if not fresh and fs.exists(where):
            self.baseline = json.loads(fs.cat_file(where))
            return self.baseline
        self.baseline = self.values()
        fs.makedirs(path, exist_ok=True)
        storage.write_json(fs, where, self.baseline)
        return self.baseline

    def check(self, step: int, logger) -> list[str]:
        """Evaluate the guards now (rank 0), log them, and return the breaches every rank agrees on."""
        g = self.config.guard
        found = None
        if self.world.is_main:
            values = self.values()
            found = breaches(values, self.baseline, g.min_diversity, g.max_heldout_drop)
            logger.log(step, {**values, "guard/breached": float(bool(found))})
            if found:
                print(f"distar train: guard breached at step {step}: {'; '.join(found)}", file=sys.stderr)
        return self.world.gather(found)[0]
