"""The evaluation protocol (METHOD.md §7), the single source of its defaults: the metrics and their paper values,
the prompt sets and where they live, the noise rule, images per prompt, the baselines' guidance; and the record of
a run's protocol that every metrics.json carries, with its digest and the first field in which two differ.

Numbers are compared only under one protocol: `check_same_protocol` names the differing field otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from distar import sources, storage
from distar.errors import UserError
from distar.prompts import HPS_STYLES, PARTI_URL

METRICS = ["imagereward", "aesthetic", "pickscore", "clip", "hpsv2.1"]
"""Every metric of the paper's tables, in their order: the default of evaluate, its components and pipelines."""
PARTI_PROMPTS = PARTI_URL
"""Where ImageReward, aesthetic, PickScore and CLIP score take their prompts from."""
PARTI_IN_CACHE = "prompts/parti/PartiPrompts.tsv"
"""The same, inside a model cache that `distar cache --models eval` wrote (what the pipelines read)."""
HPS_IN_CACHE = "prompts/hpsv2"
"""The HPSv2 benchmark prompts inside such a cache (one JSON list per style)."""
SEED = 0
"""The seed each prompt's noise is derived from."""
NOISE = (
    "one N(0, I) latent per prompt, seeded by blake2b(seed/prompt id); a many-step baseline's scheduler scales it by "
    "its init_noise_sigma once"
)
"""Part of the protocol record: results sampled under another rule (before 2026-12, a reference baseline's noise
was scaled twice) do not compare."""
IMAGES_PER_PROMPT = 1
GUIDANCE_SCALE = 7.5
"""CFG of a `reference:N` baseline (the paper's SDXL rows)."""

PARTI_METRICS = tuple(m for m in METRICS if m != "hpsv2.1")
# METHOD.md §7, the rows a run is compared against.
_METRIC_ORDER = tuple(METRICS)
PAPER = {
    label: dict(zip(_METRIC_ORDER, values, strict=True))
    for label, values in {
        "SDXL (50 steps)": (0.887, 5.72, 0.2274, 32.72, 29.05),
        "DMD2 (start point)": (0.930, 5.51, 0.2249, 32.97, 27.97),
        "Diff-Instruct (KL, CFG only)": (1.058, 5.60, 0.2253, 33.02, 29.70),
        "SIM (score divergence, CFG only)": (1.049, 5.66, 0.2273, 32.93, 30.16),
        "DI++ (KL + reward)": (1.061, 5.58, 0.2260, 32.94, 29.72),
        "DI*": (1.067, 5.74, 0.2304, 32.82, 30.22),
        "DI* longer training": (1.140, 5.83, 0.2331, 32.75, 31.19),
    }.items()
}
ABLATION_SOURCE = (
    "the paper's ablation table, (α_rew, α_cfg), Parti prompts (as the official DI* repository's README gives it)"
)
# METHOD.md §8. HPSv2.1 only where the paper reports it for the row (the DMD2, DI* and longer rows).
PAPER_ABLATION = {
    label: {m: v for m, v in zip(_METRIC_ORDER, values, strict=True) if v is not None}
    for label, values in {
        "DMD2 init": (0.938, 5.51, 0.2249, 32.97, 27.97),
        "DI++ (KL) (0, 0)": (0.846, 5.50, 0.2243, 32.66, None),
        "DI++ (KL) (0, 7.5) = Diff-Instruct": (1.058, 5.60, 0.2253, 33.02, None),
        "DI++ (KL) (100, 7.5)": (1.061, 5.58, 0.2260, 32.94, None),
        "DI*-OUT (100, 7.5)": (1.082, 5.63, 0.2263, 33.03, None),
        "DI*-IN (0, 0)": (0.782, 5.74, 0.2256, 32.16, None),
        "DI*-IN (0, 7.5) = SIM": (1.049, 5.66, 0.2273, 32.93, None),
        "DI*-IN (1, 7.5)": (1.031, 5.69, 0.2274, 32.87, None),
        "DI*-IN (10, 7.5)": (1.048, 5.66, 0.2278, 32.91, None),
        "DI*-IN (100, 4.5)": (1.020, 5.68, 0.2278, 32.82, None),
        "DI*-IN (100, 7.5)": (1.067, 5.74, 0.2304, 32.82, 30.22),
        "DI*-IN (100, 7.5) longer training": (1.140, 5.83, 0.2331, 32.75, 31.19),
    }.items()
}
"""The paper's ablation rows: ImageReward, aesthetic, PickScore, CLIP score (and HPSv2.1 where reported)."""


@dataclass
class Prompt:
    id: str
    text: str
    group: str  # Parti category, or the HPS style
    set: str  # "parti" or "hps"


def _prompt_id(set_name: str, text: str, index: int) -> str:
    return f"{set_name}-{index:05d}-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


def load_prompts(config) -> list[Prompt]:
    from distar.prompts import read_source

    prompts = []
    wanted = set(config.rewards)
    if wanted & set(PARTI_METRICS):
        texts, cats = [], []
        for rows in read_source(sources.local(config.prompts)):
            texts += rows.as_list()
            cats += rows.categories or [None] * len(rows.prompts)
        for i, (t, c) in enumerate(zip(texts, cats, strict=True)):
            if isinstance(t, str) and t.strip():
                prompts.append(Prompt(_prompt_id("parti", t, i), t.strip(), str(c or "all"), "parti"))
        if config.max_prompts:
            prompts = prompts[: config.max_prompts]
    if "hpsv2.1" in wanted:
        if not config.hps_prompts:
            raise UserError(
                "hpsv2.1 is evaluated on the HPSv2 benchmark prompts: pass --hps-prompts (a directory "
                "of anime.json, concept-art.json, paintings.json, photo.json) or drop hpsv2.1"
            )
        fs, path = storage.filesystem(sources.local(config.hps_prompts))
        for style in HPS_STYLES:
            f = f"{path.rstrip('/')}/{style}.json"
            if not fs.exists(f):
                raise UserError(f"--hps-prompts {config.hps_prompts!r} has no {style}.json")
            texts = json.loads(fs.cat_file(f))
            if config.max_prompts:
                texts = texts[: config.max_prompts]
            prompts += [Prompt(_prompt_id(f"hps-{style}", t, i), t, style, "hps") for i, t in enumerate(texts)]
    if not prompts:
        raise UserError("no prompts to evaluate: check --prompts, --hps-prompts and --rewards")
    return prompts


def prompt_digest(prompts: list[Prompt]) -> str:
    return hashlib.sha256(json.dumps([[p.group, p.id, p.text] for p in prompts]).encode()).hexdigest()


def record(config, prompts: list[Prompt]) -> dict:
    """What the numbers depend on besides the model. `image_size` is added once images exist."""
    from distar.rewards import DEFAULTS

    sets = {}
    for name, source in (("parti", config.prompts), ("hps", config.hps_prompts)):
        chosen = [p for p in prompts if p.set == name]
        if chosen:
            sets[name] = {"source": source, "count": len(chosen), "sha256": prompt_digest(chosen)}
    rewards = {}
    for name in config.rewards:
        rewards[name] = sources.provenance(config.sources.get(name) or DEFAULTS[name][0], config.cache_dir)
        if config.heads.get(name):
            rewards[name]["head"] = config.heads[name]
    return {
        "prompts": sets,
        "max_prompts": config.max_prompts,
        "seed": config.seed,
        "noise": NOISE,
        "images_per_prompt": IMAGES_PER_PROMPT,
        "t_star": config.t_star,
        "reference_guidance_scale": config.guidance_scale,
        "rewards": rewards,
        "precision": str(sources.parse_dtype(config.dtype)).removeprefix("torch."),
    }


def protocol_digest(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def protocol_difference(a: dict, b: dict, where: str = "") -> str | None:
    """The first field (dotted path) whose value differs between two protocols; None when they agree."""
    for key in sorted(set(a) | set(b)):
        path = f"{where}.{key}" if where else key
        if key not in a or key not in b:
            return path
        if isinstance(a[key], dict) and isinstance(b[key], dict):
            found = protocol_difference(a[key], b[key], path)
            if found:
                return found
        elif a[key] != b[key]:
            return path
    return None


def _field(proto: dict, path: str):
    for part in path.split("."):
        proto = proto.get(part, "(absent)") if isinstance(proto, dict) else "(absent)"
    return proto


def check_same_protocol(mine: dict, theirs: dict, what: str, allow: bool = False) -> str | None:
    """A UserError naming the first differing field, unless `allow` (then the field is returned)."""
    diff = protocol_difference(mine, theirs)
    if diff and not allow:
        raise UserError(
            f"{what} was evaluated under another protocol: {diff} is {_field(theirs, diff)!r} there and "
            f"{_field(mine, diff)!r} here. Evaluate both under one protocol, or pass --allow-protocol-mismatch"
        )
    return diff
