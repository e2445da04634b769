"""`distar lab digits`: DI* end to end on trained models and real images, in minutes of CPU (docs/LAB.md).

The handwritten digits scikit-learn ships (1,797 images of 8×8, UCI, CC BY 4.0) read at 16×16, with prompts that
name the digit ("a handwritten digit seven"). Every stage runs the production code: the SDXL backbone's classes and
pipeline layout, `distar train` for the one-step init and every variant, `distar export` for each trained
generator, stock diffusers to sample, and `distar compare` for the table. The stages:

  1. autoencoder   the tiny SDXL-shaped AutoencoderKL trained on the digits
  2. reference     the tiny SDXL-shaped UNet trained as a text-conditional ε-prediction model on the VP schedule,
                   with condition dropout for CFG: the lab's "SDXL-base" (sampled in 50 steps with CFG)
  3. rewards       a CNN trained on one split as the reward (log p of the prompted digit) and, on a disjoint split,
                   the judge: its features give the Fréchet distance (the lab's FID), its argmax the accuracy (the
                   lab's CLIP score) and its log p the held-out reward (the guard against hacking)
  4. init          the one-step generator distilled from the reference at t* with the KL divergence and CFG (DMD2)
  5. ablation      the paper's ablation rows (`compare.TABLE3`) from that init, then the comparison

Each stage's output sits under DIR/stages/<stage>-<digest of its inputs>, written to a staging folder and renamed
into place, so a second run (another grid, more variants) reuses every stage whose inputs did not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from distar import backbones, storage
from distar.errors import UserError

DIGITS_LICENCE = "UCI ML hand-written digits (Alpaydin & Kaynak), as shipped by scikit-learn; CC BY 4.0"
SIDE = 16
"""Pixels per side the lab's models read (the data's 8×8, upsampled)."""
TEMPLATE = "a handwritten digit {word}"
FAMILIES = {"sdxl": "tiny", "sd3": "tiny-sd3"}
"""The lab's families and the tiny preset each one's runs start from."""
LAB_T5_TOKENS = 32
"""T5 tokens of the flow lab's prompts ("a handwritten digit seven" is 25 characters of the character tokenizer)."""
LAB_TRANSFORMER = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64,
    pos_embed_max_size=16,
)  # fmt: skip
"""The flow lab's MMDiT: 1.70 M parameters, the size of the VP lab's UNet (1.03 M), where the test family's tiny one
(25 k) cannot learn the digits; the text widths are the tiny SD3 encoders'."""
REWARD_WEIGHT = 0.01
"""The digits reward's weight inside r: α_rew = 100 then makes α_rew·r = log p, the reward in its own unit, as the
paper's α_rew = 100 on PickScore's cosine makes it 100 · cos."""


@dataclass
class LabConfig:
    out: str
    quick: bool = False
    seed: int = 0
    vae_steps: int = 1500
    reference_steps: int = 6000
    classifier_steps: int = 1500
    init_steps: int = 1000
    variant_steps: int = 300
    batch_size: int = 32
    assistant_updates: int = 1
    """K_TA of the grid's runs (1, Diff-Instruct's and SiD's alternation; DMD2 uses 5, a study compares)."""
    init_assistant_updates: int = 5
    """K_TA of the init's distillation (DMD2's 5)."""
    images_per_digit: int = 40
    variants: list[str] = field(default_factory=list)
    """What `variant_grid` takes: rows of compare.TABLE3, NAME@conditional, NAME+key=value (empty: its default)."""
    init_alpha_cfg: float = 3.0
    """The reference's CFG when distilling the init (the lab's DMD2)."""
    family: str = "sdxl"
    """The model family of every network: "sdxl" (ε-prediction on the VP schedule, the paper's) or "sd3" (the
    rectified flow, velocity prediction, SD3's layout): the same data, rewards and grid for both."""

    @classmethod
    def make(cls, out: str, quick: bool = False, **kw) -> LabConfig:
        if quick:
            kw = {
                "vae_steps": 100, "reference_steps": 300, "classifier_steps": 300, "init_steps": 60,
                "init_assistant_updates": 1, "variant_steps": 20, "images_per_digit": 10, **kw,
                "variants": kw.get("variants") or ["kl-rew100", "score-cfg", "score-rew100"],
            }  # fmt: skip
        config = cls(out=out, quick=quick, **kw)
        if config.family not in FAMILIES:
            raise UserError(f"--family {config.family!r}: choose one of {', '.join(FAMILIES)}")
        return config


# -- the data ------------------------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, SIDE, SIDE) in [0, 1], labels (N,)): the scikit-learn digits, upsampled bilinearly."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise UserError("distar lab needs scikit-learn: run `make lab`, or pip install 'distar[lab]'") from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(SIDE, SIDE), mode="bilinear", align_corners=False).clamp(0, 1)
    return images, torch.tensor(data.target, dtype=torch.long)


def splits(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Disjoint index sets: the reward's (45 %), the judge's (35 %), and the real images FD compares with (20 %).
    The autoencoder and the reference train on the first two."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(0.45 * n), int(0.8 * n)
    return {"reward": order[:a], "judge": order[a:b], "test": order[b:], "generative": order[:b]}


def prompt(digit: int) -> str:
    from distar.rewards.digits import DIGIT_WORDS

    return TEMPLATE.format(word=DIGIT_WORDS[digit])


def rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1)


# -- the judge's metrics (pure) ---------------------------------------------------------------------------


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(Σa^½ Σb Σa^½)^½) between the Gaussians fitted to two feature sets (N, F)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over classes of tr Σ of the features within a class: how different one prompt's images are."""
    per = [torch.cov(features[labels == c].double().T).trace() for c in labels.unique() if (labels == c).sum() > 1]
    return float(torch.stack(per).mean())


@torch.no_grad()
def judge_metrics(images: torch.Tensor, labels: torch.Tensor, reward, judge, real: torch.Tensor, real_labels):
    """The lab's metrics of images (B, 3, H, W) in [0, 1] made for the digits `labels`."""
    feats, real_feats = judge.features(images), judge.features(rgb(real))
    judged = judge.head(feats)  # the judge's logits from the features already computed
    logp_judge = judged.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    logits = reward(images)
    return {
        "reward": float(logits.log_softmax(-1).gather(1, labels[:, None]).mean()),
        "heldout": float(logp_judge.mean()),
        "accuracy": float((judged.argmax(-1) == labels).float().mean()),
        "reward_accuracy": float((logits.argmax(-1) == labels).float().mean()),
        "fd": frechet_distance(feats, real_feats),
        "diversity": spread(feats, labels) / spread(real_feats, real_labels),
    }


# -- stages ------------------------------------------------------------------------------------------------


class Stages:
    """Stage outputs under root/stages, each keyed by the digest of its inputs."""

    def __init__(self, root: Path, log):
        self.root, self.log = root / "stages", log
        self.root.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, inputs: dict, build) -> tuple[Path, dict]:
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]
        final = self.root / f"{name}-{digest}"
        if (final / "stage.json").is_file():
            record = _record(final / "stage.json")
            self.log(f"{name}: reused {final.name}")
            return final, record
        staging = self.root / f".{name}-{digest}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        start = time.perf_counter()
        self.log(f"{name}: building")
        result = build(staging, final) or {}
        record = {"stage": name, "inputs": inputs, "seconds": round(time.perf_counter() - start, 1), **result}
        (staging / "stage.json").write_text(json.dumps(record, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        self.log(f"{name}: {record['seconds']} s")
        return final, record


def _record(path: Path) -> dict:
    """A JSON record the lab wrote (a stage's, an export's), through the checked reader: one message naming it."""
    from fsspec.implementations.local import LocalFileSystem

    from distar import readers

    return readers.read_mapping(LocalFileSystem(), str(path), fix="delete the folder and run the lab again")


def _batches(n: int, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (batch,), generator=g)


def _vae_config(family: str) -> dict:
    if family == "sd3":
        from distar.backbones.sd3 import TINY_VAE_CONFIG
    else:
        from distar.backbones.sdxl import TINY_VAE_CONFIG
    return {**TINY_VAE_CONFIG, "sample_size": SIDE}


def train_autoencoder(out: Path, images: torch.Tensor, steps: int, seed: int, family: str = "sdxl") -> dict:
    """The family's tiny AutoencoderKL trained on the digits; its scaling (and, where the family's VAE has one, its
    shift: SD3's) set so the networks' latents have zero mean and unit variance, as the real VAEs' are chosen."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**_vae_config(family))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x_all = rgb(images) * 2 - 1
    for idx in _batches(len(images), 64, steps, seed):
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        post = vae.encode(x_all).latent_dist
        shift = float(post.mean.mean()) if "shift_factor" in vae.config else 0.0
        scale = float(1.0 / (post.mean - shift).std())
        mse = float(F.mse_loss(vae.decode(post.mean).sample, x_all))
    vae.register_to_config(scaling_factor=scale, **({"shift_factor": shift} if "shift_factor" in vae.config else {}))
    vae.save_pretrained(out / "vae")
    return {"reconstruction_mse": mse, "scaling_factor": scale, "shift_factor": shift}


def train_reference(
    out: Path, vae_dir: Path, images, labels, steps: int, batch: int, seed: int, family: str = "sdxl"
) -> dict:
    """The lab's reference pipeline for `family` (sdxl: `train_vp_reference`; sd3: `train_flow_reference`)."""
    train = train_flow_reference if family == "sd3" else train_vp_reference
    return train(out, vae_dir, images, labels, steps, batch, seed)


def train_vp_reference(out: Path, vae_dir: Path, images, labels, steps: int, batch: int, seed: int) -> dict:
    """The pipeline directory of the lab's reference: tiny SDXL text encoders (frozen), the trained VAE, and a
    UNet trained by denoising score matching with 10 % of the conditions dropped (CFG's null condition)."""
    from diffusers import AutoencoderKL

    from distar.backbones.sdxl import build_tiny_sdxl, build_tiny_unet, tiny_unet_config

    backbone = backbones.get("sdxl")
    build_tiny_sdxl(out, seed=seed)
    shutil.rmtree(out / "vae")
    shutil.copytree(vae_dir, out / "vae")
    vae = AutoencoderKL.from_pretrained(out / "vae").requires_grad_(False)
    encoder = backbone.prompt_encoder(out)
    cond_all = encoder.encode([prompt(d) for d in range(10)], SIDE, SIDE)
    torch.manual_seed(seed)
    unet = build_tiny_unet(seed)
    unet.register_to_config(sample_size=SIDE // backbone.vae_factor(vae.config))
    assert unet.config.sample_size * backbone.vae_factor(vae.config) == SIDE, tiny_unet_config()
    schedule = backbone.schedule()

    def loss_of(idx, g):
        with torch.no_grad():
            x0 = backbone.encode(vae, rgb(images[idx]), g)
        keep = (torch.rand(len(idx), generator=g) > 0.1).float()
        d = labels[idx]
        cond = backbone.conditioning_from_embeddings(
            [cond_all.prompt_embeds[d] * keep[:, None, None], cond_all.pooled_prompt_embeds[d] * keep[:, None]],
            SIDE,
            SIDE,
        )
        t = schedule.sample_t(len(idx), 0, 1000, g)
        eps = torch.randn(x0.shape, generator=g)
        return F.mse_loss(backbone.forward(unet, schedule.add_noise(x0, eps, t), t, cond), eps)

    tail = _fit(unet, loss_of, len(images), steps, batch, seed)
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet")
    return {"denoising_loss_last10pct": tail}


def train_flow_reference(out: Path, vae_dir: Path, images, labels, steps: int, batch: int, seed: int) -> dict:
    """The lab's SD3-shaped reference: tiny SD3 text encoders (frozen), the trained 16-channel VAE, and an MMDiT
    trained with the flow-matching loss ‖v̂ − (ε − x0)‖² at σ drawn logit-normally (SD3's training density), with
    10 % of the conditions replaced by the empty prompt's encoding (SD3's CFG negative)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    from distar.backbones.flow import tiny_t5_tokenizer
    from distar.backbones.sd3 import build_tiny_sd3
    from distar.diffusion import FlowSchedule

    backbone = backbones.get("sd3")
    build_tiny_sd3(out, seed=seed)
    shutil.rmtree(out / "vae")
    shutil.copytree(vae_dir, out / "vae")
    shutil.rmtree(out / "tokenizer_3")  # T5 reads the lab's prompts (≤ 32 characters) in 32 tokens, not 256
    tiny_t5_tokenizer(LAB_T5_TOKENS).save_pretrained(out / "tokenizer_3")
    vae = AutoencoderKL.from_pretrained(out / "vae").requires_grad_(False)
    cond_all = backbone.prompt_encoder(out).encode([prompt(d) for d in range(10)], SIDE, SIDE)
    torch.manual_seed(seed)
    net = SD3Transformer2DModel(**{**LAB_TRANSFORMER, "sample_size": SIDE // backbone.vae_factor(vae.config)})
    schedule = FlowSchedule(density="logit_normal")

    def loss_of(idx, g):
        with torch.no_grad():
            x0 = backbone.encode(vae, rgb(images[idx]), g)
        keep = (torch.rand(len(idx), generator=g) > 0.1)[:, None]
        d = labels[idx]
        embeds = torch.where(keep[:, :, None], cond_all.prompt_embeds[d], cond_all.null_prompt_embeds)
        pooled = torch.where(keep, cond_all.pooled_prompt_embeds[d], cond_all.null_pooled_prompt_embeds)
        cond = dataclasses.replace(cond_all, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
        sigma = schedule.sample_t(len(idx), 0.0, 1.0, g).float()
        eps = torch.randn(x0.shape, generator=g)
        v_hat = backbone.velocity(net, schedule.add_noise(x0, eps, sigma), sigma, cond)
        return F.mse_loss(v_hat, eps - x0)

    tail = _fit(net, loss_of, len(images), steps, batch, seed)
    shutil.rmtree(out / "transformer")
    net.save_pretrained(out / "transformer")
    return {"flow_matching_loss_last10pct": tail}


def _fit(net, loss_of, n: int, steps: int, batch: int, seed: int) -> float:
    """A reference's training: `steps` batches of `batch` of the n images, loss_of(indices, generator) each, AdamW at
    lr 1e-3 decayed by a cosine, gradients clipped to norm 1. Returns the mean loss of the last 10 % of steps."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    for idx in _batches(n, batch, steps, seed):
        loss = loss_of(idx, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def train_classifier(out: Path, images, labels, steps: int, seed: int, test) -> dict:
    from distar.rewards.digits import DigitClassifier

    torch.manual_seed(seed)
    net = DigitClassifier(side=SIDE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for idx in _batches(len(images), 64, steps, seed):
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test[0]).argmax(-1) == test[1]).float().mean())
    net.save(out)
    return {"test_accuracy": accuracy}


# -- sampling through stock diffusers ------------------------------------------------------------------


def eval_latents(pipe, images_per_digit: int, seed: int, family: str = "sdxl") -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise for every model: (10 · images_per_digit latents, their digits)."""
    shape = backbones.get(family).pipeline_latent_shape(pipe)
    g = torch.Generator().manual_seed(seed + 7)
    labels = torch.arange(10).repeat_interleave(images_per_digit)
    return torch.randn(len(labels), *shape, generator=g), labels


@torch.no_grad()
def sample(
    pipeline: Path, images_per_digit: int, seed: int, steps: int | None = None, cfg: float = 0.0, family: str = "sdxl"
):
    """Images (10 · images_per_digit, 3, SIDE, SIDE) of a pipeline directory: `steps` with CFG `cfg` (the reference)
    or, with steps None, one step at the t* its export recorded."""
    backbone = backbones.get(family)
    pipe = backbone.load_pipeline(pipeline, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents, labels = eval_latents(pipe, images_per_digit, seed, family)
    texts = [prompt(int(d)) for d in labels]
    t_star = None if steps is not None else _record(pipeline / "distar.json")["t_star"]
    out = []
    for i in range(0, len(texts), 64):
        if steps is None:
            out.append(backbone.sample_one_step(pipe, texts[i : i + 64], latents[i : i + 64], t_star))
        else:
            out.append(backbone.sample_steps(pipe, texts[i : i + 64], latents[i : i + 64], steps, cfg))
    return torch.cat(out).float().clamp(0, 1), labels


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    """A PNG of images (N, 3, H, W) in [0, 1], `per_row` to a row, each scaled 4× (nearest)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / per_row)
    canvas = torch.ones(3, rows * (h + 1), per_row * (w + 1))
    for i, img in enumerate(images):
        r, c = divmod(i, per_row)
        canvas[:, r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = img
    array = (canvas.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(array).resize((canvas.shape[2] * 4, canvas.shape[1] * 4), Image.NEAREST).save(path)


# -- DI* runs through `distar train` and `distar export` ------------------------------------------------


def write_prompts(path: Path) -> Path:
    """The lab's prompt set in the layout `distar curate` writes: each digit's prompt, ten rows each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [prompt(d) for _ in range(10) for d in range(10)]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": texts}), path / "part-00000.parquet")
    return path


def train_and_export(
    out: Path, config: LabConfig, init: str, overrides: list[str], steps: int, ctx: dict, k: int | None = None
) -> dict:
    """`distar train` (one process, the tiny preset's settings, the lab's models) and `distar export`."""
    from distar.export import ExportConfig, export
    from distar.train import run

    run_dir = out / "run"
    base = [
        f"out={run_dir}",
        f"steps={steps}",
        f"seed={config.seed}",
        f"model.reference={ctx['reference']}",
        f"model.generator_init={init}",
        "model.assistant_init=reference",
        f'reward.weights={{"digits": {REWARD_WEIGHT}}}',
        f'reward.sources={{"digits": "{ctx["reward"]}"}}',
        f"data.prompts={ctx['prompts']}",
        f"data.resolution={SIDE}",
        f"data.batch_size={config.batch_size}",
        "parallel.strategy=none",
        "parallel.device=cpu",
        f"assistant_updates={config.assistant_updates if k is None else k}",
        "generator_optim.lr=1e-4",
        "assistant_optim.lr=1e-4",
        "generator_optim.beta1=0.0",
        "assistant_optim.beta1=0.0",
        "ema_decay=0",  # the judge scores the raw weights (runs of 20 to 1,000 steps)
        f"checkpoint.every={steps}",
        "checkpoint.keep_last=1",
        f"log.every={max(1, steps // 20)}",
        f"log.sample_every={steps}",
        "log.sample_prompts=10",
        "log.progress=false",
    ]
    summary = run(FAMILIES[config.family], base + list(overrides))
    export(ExportConfig(str(run_dir), str(out / "pipeline"), dtype="fp32"))
    return {"train": {k: summary[k] for k in ("steps", "seconds") if k in summary}, "overrides": list(overrides)}


def measure(name: str, pipeline: Path, config: LabConfig, ctx: dict, steps: int | None = None, cfg: float = 0.0):
    """The judge's metrics of a pipeline's images; their grid (a row per digit, the same seeds in every grid) and
    an evaluation record that `distar compare` reads, under DIR/evaluations/NAME."""
    images, labels = sample(pipeline, config.images_per_digit, config.seed, steps, cfg, config.family)
    metrics = judge_metrics(images, labels, ctx["reward_net"], ctx["judge_net"], *ctx["real"])
    ctx["evaluations"][name] = write_evaluation(ctx["root"] / "evaluations" / name, name, images, labels, metrics, ctx)
    grid = images.view(10, config.images_per_digit, *images.shape[1:])[:, : min(10, config.images_per_digit)]
    save_grid(grid.flatten(0, 1), ctx["root"] / "evaluations" / name / "grid.png", grid.shape[1])
    return metrics


STUDIES = [
    "score-rew100+assistant_updates=5",
    "kl-rew100+assistant_updates=5",
    "score-rew100+loss.huber_c=0.1",
    "score-rew100+loss.huber_c=10",
    "score-rew100+loss.reduction=mean",
    "score-rew100+loss.weighting=sigma2",
    "score-rew100+loss.weighting=x0",
    "score-rew100+loss.form=full",
    "score-rew100+loss.score_normalise=true",
    "score-rew100-cfg-out+loss.cfg_t_min=500+loss.cfg_weighting=sigma2",
]
"""The knobs the paper leaves open, each a change to one grid row: K_TA = 5 (DMD2) against the lab's 1 (Diff-Instruct,
SiD), pseudo-Huber's c, the per-element reduction, w(t), the full form against sim, SiD's per-sample normaliser,
and DI*-OUT's CFG term at large t only."""


def variant_grid(names: list[str]) -> list[dict]:
    """The variants to run: compare.TABLE3's rows by name, "NAME@conditional" for a row under the other α_cfg
    reading, "NAME+key=value[+key=value…]" for a row with config keys changed. Default: every row, both (0, 0)
    rows under the conditional reading, and STUDIES."""
    from distar.compare import TABLE3

    table = {v["name"]: v for v in TABLE3}
    chosen = []
    default = [v["name"] for v in TABLE3] + ["kl-cfg0@conditional", "score-cfg0@conditional", *STUDIES]
    for name in names or default:
        head, *extra = name.split("+")
        base, _, convention = head.partition("@")
        if base not in table or convention not in ("", "diffusers", "conditional") or not all("=" in e for e in extra):
            raise UserError(
                f"--variants: {name!r} is not a row of the grid ({', '.join(table)}), optionally with @conditional "
                "(the other α_cfg reading) and +key=value config changes"
            )
        v = table[base]
        overrides = v["overrides"] + [f"loss.cfg_convention={convention or 'diffusers'}", *extra]
        # a row with a knob changed is not the paper's row (whose knobs are not published)
        chosen.append({**v, "name": name, "overrides": overrides, "paper": "" if extra else v["paper"]})
    return chosen


# -- the lab ---------------------------------------------------------------------------------------------


def run_lab(config: LabConfig, log=print) -> dict:
    """Every stage (reused where its inputs did not change), the grid, `distar compare`; writes DIR/lab.json."""
    from distar.rewards.digits import DigitClassifier

    torch.set_num_threads(max(1, torch.get_num_threads()))
    storage.check_output("--out", config.out)
    root = Path(config.out).resolve()  # lab.json names absolute paths
    stages = Stages(root, log)
    images, labels = digits()
    sp = splits(len(images), config.seed)
    real = (images[sp["test"]], labels[sp["test"]])
    started = time.perf_counter()
    lab: dict = {"data": DIGITS_LICENCE, "prompt_template": TEMPLATE, "side": SIDE, "quick": config.quick,
                 "config": dataclasses.asdict(config), "stages": {}, "variants": {}}  # fmt: skip

    def record(name, path, rec):
        lab["stages"][name] = {"path": str(path), **{k: v for k, v in rec.items() if k != "inputs"}}

    # the VP lab's stage digests stay what they were; another family's stages are its own
    base = {"seed": config.seed, "side": SIDE, "version": 1} | (
        {"family": config.family} if config.family != "sdxl" else {}
    )
    ae_in = {**base, "steps": config.vae_steps}
    ae, rec = stages.run("autoencoder", ae_in, lambda tmp, _: train_autoencoder(
        tmp, images[sp["generative"]], config.vae_steps, config.seed, config.family))  # fmt: skip
    record("autoencoder", ae, rec)
    ref_in = {**base, "autoencoder": ae.name, "steps": config.reference_steps, "batch": config.batch_size}
    ref, rec = stages.run("reference", ref_in, lambda tmp, _: train_reference(
        tmp / "pipeline", ae / "vae", images[sp["generative"]], labels[sp["generative"]], config.reference_steps,
        config.batch_size, config.seed, config.family))  # fmt: skip
    record("reference", ref, rec)
    rw_in = {**base, "steps": config.classifier_steps}
    rw, rec = stages.run("rewards", rw_in, lambda tmp, _: {
        "reward": train_classifier(tmp / "reward", images[sp["reward"]], labels[sp["reward"]],
                                   config.classifier_steps, config.seed + 1, real),
        "judge": train_classifier(tmp / "judge", images[sp["judge"]], labels[sp["judge"]],
                                  config.classifier_steps, config.seed + 2, real)})  # fmt: skip
    record("rewards", rw, rec)
    ctx = {
        "reference": ref / "pipeline",
        "reward": rw / "reward",
        "prompts": write_prompts(root / "prompts"),
        "reward_net": DigitClassifier.load(rw / "reward").eval(),
        "judge_net": DigitClassifier.load(rw / "judge").eval(),
        "real": real,
        "root": root,
        "evaluations": {},
        "runs": {},
        "protocol": {
            "lab": "digits",
            "side": SIDE,
            "seed": config.seed,
            "images_per_digit": config.images_per_digit,
            "judge": rw.name,
            "real_images": len(real[1]),
            "prompt_template": TEMPLATE,
        },
        "backbone": config.family,
    }
    real_metrics = judge_metrics(rgb(real[0]), real[1], ctx["reward_net"], ctx["judge_net"], *real)
    lab["real_test_images"] = real_metrics
    lab["reference_50_steps"] = measure("reference", ref / "pipeline", config, ctx, 50, config.init_alpha_cfg)
    log(f"reference (50 steps, CFG {config.init_alpha_cfg:g}): {lab['reference_50_steps']}")
    init_over = ["loss.divergence=kl", "loss.kl_normalise=true", "loss.alpha_rew=0",
                 f"loss.alpha_cfg={config.init_alpha_cfg:g}"]  # fmt: skip
    init_in = {**base, "reference": ref.name, "rewards": rw.name, "steps": config.init_steps, "over": init_over,
               "k": config.init_assistant_updates, "batch": config.batch_size}  # fmt: skip
    init, rec = stages.run("init", init_in, lambda tmp, _: train_and_export(
        tmp, config, "reference", init_over, config.init_steps, ctx, config.init_assistant_updates))  # fmt: skip
    record("init", init, rec)
    ctx["runs"]["init"] = str(init / "run")
    lab["init"] = {"path": str(init / "pipeline"), **measure("init", init / "pipeline", config, ctx)}
    log(f"init: {lab['init']}")
    lab["untrained_one_step"] = _untrained(root / "untrained", init / "pipeline", config, ctx)
    for v in variant_grid(config.variants):
        v_in = {**base, "init": init.name, "rewards": rw.name, "steps": config.variant_steps, "over": v["overrides"],
                "k": config.assistant_updates, "batch": config.batch_size}  # fmt: skip
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", v["name"])
        path, rec = stages.run(f"variant-{slug}", v_in, lambda tmp, _, v=v: train_and_export(
            tmp, config, str(init / "pipeline"), v["overrides"], config.variant_steps, ctx))  # fmt: skip
        ctx["runs"][v["name"]] = str(path / "run")
        lab["variants"][v["name"]] = {"path": str(path / "pipeline"), "paper_row": v["paper"],
                                      "settings": v["settings"], "seconds": rec["seconds"],
                                      **measure(v["name"], path / "pipeline", config, ctx)}  # fmt: skip
        log(f"{v['name']}: {lab['variants'][v['name']]}")
    lab["seconds"] = round(time.perf_counter() - started, 1)
    report(root, lab, ctx)
    (root / "lab.json").write_text(json.dumps(lab, indent=1))
    return lab


def _untrained(folder: Path, init: Path, config: LabConfig, ctx: dict) -> dict:
    """The init's pipeline with a network that was never trained (fresh weights of its config): FD's far end."""
    backbone = backbones.get(config.family)
    part = backbone.pipeline_parts[-1]  # the denoiser's folder: unet, transformer
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(init, folder, ignore=shutil.ignore_patterns(backbone.ema_part))
    shutil.rmtree(folder / part)
    torch.manual_seed(config.seed + 3)
    config_json = json.loads((init / part / "config.json").read_text())
    backbone.build_denoiser({k: v for k, v in config_json.items() if not k.startswith("_")}).save_pretrained(
        folder / part
    )
    return measure("untrained", folder, config, ctx)


# -- records and the report -------------------------------------------------------------------------------


def write_evaluation(folder: Path, name: str, images, labels, metrics: dict, ctx: dict) -> str:
    """An evaluation directory as `distar compare` reads it: metrics.json (the lab's protocol, its digest, the
    metrics, the training run), one image per digit under images/model/, and scores.parquet naming their prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images" / "model").mkdir(parents=True)
    ids, texts = [], []
    for d in range(10):
        i = int((labels == d).nonzero()[0, 0])
        pid = f"digit-{d}"
        array = (images[i].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(array).resize((4 * SIDE, 4 * SIDE), Image.NEAREST).save(
            folder / "images" / "model" / f"{pid}.png"
        )
        ids.append(pid)
        texts.append(prompt(d))
    pq.write_table(pa.table({"id": ids, "prompt": texts}), folder / "scores.parquet")
    protocol = ctx["protocol"]
    digest = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()
    run = ctx.get("runs", {}).get(name)
    record = {"model": name, "label": name, "run": run, "protocol": protocol, "protocol_digest": digest,
              "backbone": ctx.get("backbone", "sdxl"), "results": {"model": metrics}}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(record, indent=1))
    return str(folder)


def report(root: Path, lab: dict, ctx: dict) -> None:
    """`distar compare` over the variants (init and reference as baselines) and the reward-against-FD figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distar.compare import compare

    names = list(lab["variants"])
    if names:
        compare(
            [ctx["evaluations"][n] for n in names],
            str(root / "comparison"),
            initial=ctx["evaluations"]["init"],
            reference=ctx["evaluations"]["reference"],
            paper={n: lab["variants"][n]["paper_row"] for n in names},
            images=10,
        )
        lab["comparison"] = str(root / "comparison" / "report.html")
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    for divergence, colour in (("kl", "tab:orange"), ("score", "tab:blue")):
        for studies in (False, True):  # a grid row: filled; a row with a knob changed: hollow
            chosen = [(n, v) for n, v in lab["variants"].items()
                      if v["settings"]["divergence"] == divergence and ("+" in n) == studies]  # fmt: skip
            ax.scatter(
                [v["fd"] for _, v in chosen],
                [max(-v["reward"], 1e-6) for _, v in chosen],
                label=divergence + (" (knob changed)" if studies else ""),
                facecolors="none" if studies else colour,
                edgecolors=colour,
            )
            for n, v in chosen:
                ax.annotate(
                    n, (v["fd"], max(-v["reward"], 1e-6)), fontsize=5.5, xytext=(3, 2), textcoords="offset points"
                )
    for key, marker in (("init", "s"), ("reference_50_steps", "*")):
        ax.scatter([lab[key]["fd"]], [max(-lab[key]["reward"], 1e-6)], c="k", marker=marker, label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FD of the judge's features to real digits (lower: closer to the data)")
    ax.set_ylabel("−reward: −mean log p(prompted digit)")
    ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(root / "pareto.png")
    plt.close(fig)
    lab["figure"] = str(root / "pareto.png")
