"""The trainer's configuration: one tree of dataclasses, presets as TOML files, `key=value` overrides.

`--config tiny` / `--config sdxl` name the presets in distar/presets/; any other value is a TOML or JSON file
(the `config.json` saved with every checkpoint is one). Each field's docstring says what it means and, where
the paper or its lineage fixes a value, where that value comes from (METHOD.md §6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from distar import backbones, readers, storage
from distar.backbones.sdxl import DMD2_REPO, DMD2_UNET_1STEP, GENERATOR_TIMESTEP, SDXL_BASE
from distar.config import apply_mapping, apply_overrides, check_choices
from distar.errors import UserError, redact
from distar.losses import DivergenceConfig, Weighting, guidance_scale

PRESETS = ("tiny", "sdxl", "sdxl-1gpu", "tiny-sd3", "tiny-flux", "sd35m", "sd35m-8gpu", "flux", "flux-1gpu")
DType = Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"]
"""A weight dtype's name; the long names are written as the short ones when a config is loaded."""
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class ModelConfig:
    backbone: Literal[backbones.NAMES] = backbones.DEFAULT
    """The model family (`distar.backbones`): its schedule, conditioning, loaders and pipeline. The defaults below
    are SDXL's."""
    reference: str = SDXL_BASE
    """The reference SDXL pipeline (UNet, text encoders, tokenizers, VAE): hub id, directory, fsspec URI, or
    `tiny:sdxl` for the tiny preset's models."""
    revision: str | None = None
    """Hub revision of `reference` (a commit hash pins it)."""
    generator_init: str = f"{DMD2_REPO}:{DMD2_UNET_1STEP}"
    """The generator's initial UNet: a raw SDXL-UNet state dict (`org/name:file`, a .bin/.safetensors path or URI;
    DMD2's 1-step UNet by default), a diffusers UNet or pipeline source, or "reference" (a copy of the reference)."""
    generator: Literal["full", "lora"] = "full"
    """"full": every weight of the generator's UNet trains (the paper); "lora": LoRA adapters on the attention
    projections of its initial UNet, whose weights stay frozen in `reference_dtype`. Saves the generator's fp32
    weights, gradients and AdamW states (a UNet's worth of each); checkpoints hold the adapters, and `distar
    export` merges them into a plain UNet."""
    generator_lora_rank: int = 64
    """Rank of the generator's LoRA adapters (model.generator = "lora")."""
    generator_lora_alpha: float = 64.0
    """The generator's LoRA scaling numerator (the update is scaled by alpha / rank)."""
    assistant_init: str = "reference"
    """The assistant's initial UNet: "reference" (a trainable copy, as in DMD2/SiD) or a diffusers UNet source."""
    assistant: Literal["full", "lora"] = "full"
    """"full": the assistant is a whole trainable UNet; "lora": LoRA adapters (peft) on the frozen reference UNet,
    one UNet serving both (adapters off: the reference, on: the assistant). LoRA saves a UNet's weights,
    gradients and AdamW states (what fits SDXL DI* on one 80 GB GPU), at the price of the assistant's capacity
    to follow the generator (docs/TRAINING.md, "A LoRA assistant")."""
    assistant_lora_rank: int = 64
    """Rank of the assistant's LoRA adapters (on every attention projection: to_q, to_k, to_v, to_out.0)."""
    assistant_lora_alpha: float = 64.0
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    vae: str | None = None
    """A VAE source other than the reference's (e.g. madebyollin/sdxl-vae-fp16-fix); None: the reference's."""
    t_star: int = GENERATOR_TIMESTEP
    """The generator's fixed timestep t* (DMD2's 1-step convention: 399)."""
    cache_dir: str | None = None
    """Model cache written by `distar cache`; hub ids found there are read from it."""
    offline: bool = False
    """Never contact the hub (also set by HF_HUB_OFFLINE=1)."""
    reference_dtype: DType = "bf16"
    """Weights of the frozen reference UNet."""
    text_encoder_dtype: DType = "bf16"
    """Weights of the frozen text encoders."""
    text_encoder_offload: bool = False
    """Keep the text encoders in host memory and copy them to the GPU for each batch's encoding only (their GPU
    copy is dropped right after): the flow families' T5-XXL (4.76 B parameters, 8.9 GiB in bf16) then takes no GPU
    memory during the updates, for one host-to-device copy per step."""
    vae_dtype: DType = "fp32"
    """Weights of the frozen VAE (the SDXL VAE overflows in fp16; bf16 or fp16 only with the fp16-fix VAE)."""
    vae_fp32_norms: bool = True
    """With a bf16 or fp16 VAE, keep its GroupNorm layers in fp32 (input cast up, fp32 weights, output cast back):
    at 1024² the decoder's normalisation statistics run over 1024² pixels per group. The decode's error against
    fp32 is measured in docs/PERFORMANCE.md, "The VAE decoder in bf16"."""


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"pickscore": 1.0})
    """Reward terms and their weights, r = Σ w_i r_i (names: pickscore, hpsv2.1, imagereward, clip, aesthetic).
    From the command line: reward.weights='{"pickscore": 1, "hpsv2.1": 0.5}'."""
    sources: dict[str, str] = field(default_factory=dict)
    """Model source per reward name, where not the default (hub id, directory, URI, tiny:…)."""
    processors: dict[str, str] = field(default_factory=dict)
    """Tokenizer/processor source per reward name, where not the default."""
    heads: dict[str, str] = field(default_factory=dict)
    """Head file per reward name (the aesthetic MLP), where not the default."""
    dtype: DType = "bf16"
    """Weights of the frozen reward models."""

    def spec(self, name: str, weight: float = 1.0):
        """The RewardSpec of reward `name` with its configured sources (trained or watched by the guardrails)."""
        from distar.rewards import RewardSpec

        return RewardSpec(name, weight, self.sources.get(name), self.processors.get(name), self.heads.get(name))


@dataclass
class LossConfig(DivergenceConfig):
    """The generator loss L_G = −α_rew·r + L_div: the divergence's fields (DivergenceConfig) and these."""

    alpha_rew: float = 100.0
    """α_rew in L_G = −α_rew·r + L_div (paper: 100)."""
    alpha_cfg: float = 7.5
    """α_cfg of the reference (paper: 7.5), read under `cfg_convention`."""
    cfg_convention: Literal["diffusers", "conditional"] = "diffusers"
    """How α_cfg is read (the paper does not say; docs/METHOD.md §6): "diffusers" ε_∅ + α(ε_c − ε_∅), the reading
    of "SDXL with CFG 7.5" in diffusers, where α = 0 is the unconditional model; "conditional" ε_c + α(ε_c − ε_∅),
    where α = 0 is the conditional model (no guidance) and α means diffusers' α + 1. The paper's (0, 0) rows lose
    CLIP score against DMD2 by less than an unconditional reference would suggest, which reads better as
    "conditional"; the presets keep "diffusers" because the paper calls its reference "SDXL with CFG 7.5"."""
    cfg: Literal["divergence", "reward"] = "divergence"
    """Where CFG acts: "divergence" (DI*-IN, the paper's choice: the divergence is taken to the CFG reference) or
    "reward" (the divergence to the conditional reference plus the implicit reward (α_cfg − 1) log p(c|x_t))."""
    t_min: int = 20
    """Smallest t of the generator loss (DMD2: 20)."""
    t_max: int = 980
    """Largest t, exclusive, of the generator loss (DMD2: 980)."""
    cfg_t_min: int | None = None
    """With cfg = "reward" (DI*-OUT): the smallest t of the CFG term, drawn apart from the divergence's t with its
    own noise; None (with cfg_t_max and cfg_weighting None too): the divergence's t, noise and w(t)."""
    cfg_t_max: int | None = None
    """With cfg = "reward": the largest t, exclusive, of the CFG term (None: t_max when the term has its own t)."""
    cfg_weighting: Weighting | None = None
    """With cfg = "reward": w(t) of the CFG term (None: `weighting`)."""
    sigma_density: Literal["uniform", "logit_normal"] = "uniform"
    """Flow families: how σ is drawn on [t_min, t_max]/1000, "uniform" (the flow-reward codes' choice) or
    "logit_normal" (SD3's training density; ours to try), truncated exactly to the range."""
    sigma_shift: bool = False
    """Flow families: shift the σ draws by the model's own time shift (SD3.5: 3; FLUX: by the image size)."""
    assistant_t_min: int = 0
    """Smallest t of the assistant's denoising loss."""
    assistant_t_max: int = 1000
    """Largest t, exclusive, of the assistant's denoising loss."""

    def guidance_scale(self) -> float:
        """α_cfg as diffusers' scale, under `cfg_convention`."""
        return guidance_scale(self.alpha_cfg, self.cfg_convention)

    def cfg_own_noise(self) -> bool:
        """Whether the CFG term (DI*-OUT) draws its own t and noise or weights them its own way."""
        return (self.cfg_t_min, self.cfg_t_max, self.cfg_weighting) != (None, None, None)

    def cfg_range(self) -> tuple[int, int]:
        """[lo, hi) of the CFG term's t."""
        return (self.t_min if self.cfg_t_min is None else self.cfg_t_min,
                self.t_max if self.cfg_t_max is None else self.cfg_t_max)  # fmt: skip


@dataclass
class OptimConfig:
    lr: float = 5e-7
    """AdamW learning rate (DMD2 SDXL: 5e-7 for both networks)."""
    beta1: float = 0.9
    """AdamW β1 (DMD2: 0.9; SiD: 0.0)."""
    beta2: float = 0.999
    """AdamW β2."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (DMD2: 0.01)."""
    eps: float = 1e-8
    """AdamW ε."""
    grad_clip: float = 10.0
    """Clip the gradient's global norm to this (DMD2: 10); 0 turns clipping off."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many updates of this network."""
    implementation: Literal["auto", "fused", "foreach"] = "auto"
    """AdamW kernels: "foreach" (multi-tensor passes), "fused" (one fused kernel), or "auto": fused where torch
    has it for the weights' device (CUDA, CPU), since only fused skips a non-finite update on the device, without
    a host read per update (docs/TRAINING.md); foreach elsewhere. Which of the two is faster on a GPU is not
    measured apart from FSDP yet (docs/PERFORMANCE.md §5)."""


@dataclass
class DataConfig:
    prompts: str = ""
    """The curated prompt set: a Parquet file, or a directory/URI of Parquet shards (`distar curate` writes them);
    `tiny:prompts` for the tiny preset. Shards with prompt_embeds/pooled_prompt_embeds columns skip the text
    encoders."""
    prompt_column: str = "prompt"
    """The column holding the prompt text."""
    use_embeddings: bool = True
    """Use precomputed text embeddings when the shards hold them."""
    batch_size: int = 2
    """Prompts per process per micro-batch (DMD2 SDXL: 2 per GPU)."""
    grad_accum: int = 1
    """Micro-batches per update: the global batch is world_size × batch_size × grad_accum."""
    resolution: int = 1024
    """Image side in pixels; latents are resolution / the VAE's downsampling factor."""
    shuffle: bool = True
    """A new deterministic permutation of the prompts every epoch."""


@dataclass
class ParallelConfig:
    strategy: Literal["fsdp", "ddp", "none"] = "fsdp"
    """"fsdp" (FSDP2 fully_shard per UNet block, the SDXL setting), "ddp" (replicas, for small models) or
    "none" (one process)."""
    activation_checkpointing: bool = True
    """Recompute each UNet block's activations in the backward pass (applied before sharding)."""
    vae_checkpointing: bool = True
    """Recompute the VAE decoder's ResNet blocks in the backward pass of the reward gradient."""
    mixed_precision: Literal["bf16", "fp32"] = "bf16"
    """Compute dtype of the UNets, VAE and rewards: "bf16" (autocast and FSDP2 param dtype) or "fp32". Master
    weights and optimizer states stay fp32; gradients are reduced in fp32."""
    compile: bool = False
    """Regional compilation: torch.compile each UNet block and the VAE decoder (after activation checkpointing,
    before FSDP, the torchtitan order), which fuses the norms and element-wise work between the matrix products
    and cuts kernel launches. The first steps pay the compile; `compile_cache` keeps it for restarts."""
    bf16_weight_copies: bool = False
    """Under bf16 autocast without FSDP: the passes whose weights cannot change while they run (the generator's
    samples for the K_TA assistant updates, the frozen assistant in the generator update) use bf16 copies of the
    Linear and Conv2d weights made once, instead of autocast's cast on every call and recompute. The same bits
    as autocast; costs one bf16 copy of a UNet while they run (`distar plan` counts it). FSDP's mixed precision
    makes its own copies per block."""
    channels_last: bool = False
    """The UNets' and the VAE's 4-D weights (and so their convolutions) in channels_last (NHWC) memory order,
    which cuDNN's bf16 convolutions read without layout conversions."""
    compile_cache: str | None = None
    """A directory for inductor's compiled kernels and graphs (TORCHINDUCTOR_CACHE_DIR), e.g. a persistent volume:
    a restarted or resumed run finds them there. None: inductor's default (a temporary directory)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: "auto" (nccl on GPUs, gloo on CPU), "nccl" or "gloo"."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """"auto" (the local GPU when there is one, else the CPU), "cuda" or "cpu"."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_last: int = 3
    """Keep this many complete checkpoints; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Load the newest complete checkpoint under the output URI, if any, before training."""


@dataclass
class GuardConfig:
    """Guardrails against reward hacking (distar/train/guard.py): measured every log.sample_every steps."""

    seeds: int = 0
    """Images per guard prompt, each from its own fixed noise; 2 or more turns the guardrails on (0: off)."""
    prompts: int = 4
    """Guard prompts: the first of the prompt set."""
    heldout: list[str] = field(default_factory=list)
    """Rewards to watch but not train on (e.g. ["imagereward", "hpsv2.1", "clip"] while training on PickScore);
    their sources come from reward.sources / processors / heads as for trained rewards."""
    diversity_model: str = "clip"
    """The CLIP reward whose image features measure diversity (its source: reward.sources, as above)."""
    min_diversity: float = 0.0
    """Breach when diversity falls below this fraction of the initial generator's (e.g. 0.8); 0: no such guard."""
    max_heldout_drop: dict[str, float] = field(default_factory=dict)
    """Breach when a held-out reward falls below its start by more than this, per name, on the paper's scale."""
    stop_on_breach: bool = False
    """Stop the run at the first breach (the best checkpoint stays the newest one written before it)."""

    @property
    def enabled(self) -> bool:
        return self.seeds >= 2 or bool(self.heldout)


@dataclass
class LeaseConfig:
    stale_minutes: float = 30.0
    """A lease (LEASE.json under `out`) whose heartbeat counter this host has watched standing still for this long
    is reported as a dead run's (no clocks are compared; distar/train/lease.py)."""
    take_over: bool = False
    """Take the lease over from another trainer: if that one still runs, it stops at its next write (exit 75)."""


@dataclass
class LogConfig:
    every: int = 10
    """Write metrics (JSONL, TensorBoard) every this many steps."""
    sample_every: int = 500
    """Write a sample image grid (fixed prompts and noise) and its reward every this many steps, and at the end."""
    sample_prompts: int = 8
    """Prompts in the sample grid (the first of the prompt set)."""
    tensorboard: bool = True
    """Also write TensorBoard event files."""
    progress: bool = True
    """A tqdm progress bar on rank 0."""


def config_digest(resolved: dict) -> str:
    """The short hash of a resolved config (`TrainConfig.to_dict()`, or the config.json a run wrote)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TrainConfig:
    """Everything a DI* training run depends on; saved as config.json with every checkpoint."""

    out: str = "runs/train"
    """Output URI of the run (local path, file://, gs://, s3://): checkpoints/, logs/, samples/."""
    steps: int = 20000
    """Generator updates (ignored when `kimg` is set)."""
    kimg: float = 0.0
    """The run's length in thousands of images the generator sees, the unit of the SiD/DI* lineage; when > 0 it
    sets the number of generator updates to ⌈kimg · 1000 / global batch⌉ for the world size the run starts with.
    The paper does not state its run lengths; the official release's run names suggest about 256 kimg for the
    ablation and 1,485 for the longer run (an inference; docs/METHOD.md §8)."""
    assistant_updates: int = 5
    """K_TA: assistant updates per generator update (DMD2: 5; Diff-Instruct and SiD: 1)."""
    assistant_warmup: int = 0
    """Assistant-only updates before the generator's first update (a fresh run only). The assistant starts as the
    reference while the generator starts from DMD2, so without them the first generator updates follow a score
    that is not yet the generator's. Not published; 0 (off) by default."""
    ema_decay: float = 0.0
    """EMA of the generator's weights, updated after every generator update; 0 turns it off."""
    max_nonfinite: int = 5
    """Abort after this many non-finite updates in a row (each one is skipped and counted)."""
    seed: int = 0
    """Seed of the initial noise streams, data order and sample grid."""
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    assistant_optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def total_steps(self, world_size: int) -> int:
        """Generator updates of the run: `steps`, or `kimg` over the global batch of `world_size` processes."""
        if self.kimg > 0:
            return max(1, math.ceil(self.kimg * 1000 / (world_size * self.data.batch_size * self.data.grad_accum)))
        return self.steps

    def to_dict(self) -> dict:
        """The resolved config as written beside every checkpoint: credentials inside URIs are redacted."""
        return redact_values(dataclasses.asdict(self))

    def digest(self) -> str:
        """A short hash of the resolved config, for lineage."""
        return config_digest(self.to_dict())

    def changed_keys(self, saved: dict) -> list[str]:
        """Keys whose value differs from a saved config.json, except those a resumed run may change
        (RESUME_SAFE_KEYS)."""
        now, before = _flat(self.to_dict()), _flat(saved)
        before.setdefault("model.backbone", backbones.DEFAULT)  # configs saved before there was a choice
        keys = sorted(set(now) | set(before))
        changed = [k for k in keys if now.get(k) != before.get(k)]
        return [k for k in changed if not any(k == s or k.startswith(s + ".") for s in RESUME_SAFE_KEYS)]

    def validate(self) -> TrainConfig:
        """Every section's checks, then the checks across sections (the choices are checked by the loader, from
        each field's Literal type); each failure names the key and what to set. Long dtype names become short."""
        check_choices(self)
        for section in (self.model, self.reward):
            for f in dataclasses.fields(section):
                if f.name.endswith("dtype"):
                    value = getattr(section, f.name)
                    setattr(section, f.name, _SHORT_DTYPE.get(value, value))
        self._validate_run()
        self._validate_numbers()
        self._validate_model()
        self._validate_reward()
        self._validate_loss()
        self._validate_data()
        self._validate_guard()
        self._validate_parallel()
        return self

    def _validate_run(self) -> None:
        readers.check_out_path("config key 'out'", self.out)
        if storage.is_root(self.out):
            raise UserError(
                f"config key 'out' is {self.out!r}: name the run's own directory or URI (e.g. out=runs/r1 or "
                "out=gs://BUCKET/runs/r1); a root or empty output would scatter checkpoints and logs"
            )
        positive = {
            "steps": self.steps,
            "checkpoint.every": self.checkpoint.every,
            "checkpoint.keep_last": self.checkpoint.keep_last,
            "log.every": self.log.every,
            "log.sample_every": self.log.sample_every,
            "max_nonfinite": self.max_nonfinite,
        }
        _at_least_one(positive)
        if self.assistant_warmup < 0:
            raise UserError(f"config key 'assistant_warmup' must be 0 or more, got {self.assistant_warmup}")
        if self.assistant_updates < 0:
            raise UserError(f"config key 'assistant_updates' must be 0 or more, got {self.assistant_updates}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"config key 'ema_decay' must be in [0, 1), got {self.ema_decay}")

    def _validate_numbers(self) -> None:
        for key, value, lo, lo_open in self._domains():
            if not math.isfinite(value) or value < lo or (lo_open and value == lo):
                bound = f"> {lo:g}" if lo_open else f"≥ {lo:g}"
                raise UserError(f"config key {key!r} must be a finite number {bound}, got {value}")
        for key in ("generator_optim.beta1", "generator_optim.beta2", "assistant_optim.beta1", "assistant_optim.beta2"):
            section, name = key.split(".")
            if not 0.0 <= getattr(getattr(self, section), name) < 1.0:
                raise UserError(f"config key {key!r} must be in [0, 1), got {getattr(getattr(self, section), name)}")

    def _validate_model(self) -> None:
        m = self.model
        try:
            backbones.get(m.backbone).check_t_star(m.t_star)
        except ValueError as err:
            raise UserError(f"config key 'model.t_star': {err}") from None
        if backbones.get(m.backbone).prediction != "flow" and (
            self.loss.sigma_density != "uniform" or self.loss.sigma_shift
        ):
            raise UserError(
                f"loss.sigma_density and loss.sigma_shift shape a flow family's σ draws; {m.backbone} draws its "
                "timesteps uniformly from its table: leave them unset"
            )
        if backbones.get(m.backbone).prediction == "flow" and self.loss.assistant_t_max > 990:
            raise UserError(
                f"loss.assistant_t_max={self.loss.assistant_t_max}: on a flow path the assistant's flow-matching "
                "loss is read from its ε error, which vanishes as σ → 1 (weight 1/(1 − σ)²); keep it at most 990 "
                "(the flow presets use 980)"
            )
        if backbones.get(m.backbone).guidance == "embedded" and self.loss.cfg == "reward":
            raise UserError(
                f'loss.cfg = "reward" (DI*-OUT) needs a reference with an unconditional branch; {m.backbone}\'s is '
                'guidance-distilled (its guidance is embedded): use loss.cfg = "divergence"'
            )
        if m.assistant == "lora" and m.assistant_init != "reference":
            raise UserError(
                "model.assistant='lora' puts adapters on the reference: model.assistant_init must be 'reference'"
            )
        for network in ("assistant", "generator"):
            if getattr(m, network) == "lora" and (
                getattr(m, f"{network}_lora_rank") < 1 or not getattr(m, f"{network}_lora_alpha") > 0
            ):
                raise UserError(f"model.{network}_lora_rank must be at least 1 and model.{network}_lora_alpha positive")

    def _validate_reward(self) -> None:
        bad_weights = {k: w for k, w in self.reward.weights.items() if not readers.is_number(w) or w < 0}
        if bad_weights:
            raise UserError(
                f"config key 'reward.weights': every weight must be a finite number ≥ 0, got {str(bad_weights)[:200]} "
                "(write e.g. reward.weights='{\"pickscore\": 1}')"
            )
        if not any(self.reward.weights.values()) and self.loss.alpha_rew != 0:
            raise UserError(
                "reward.weights is empty or all 0 but loss.alpha_rew is not 0: weight a reward or set loss.alpha_rew=0"
            )
        if self.loss.alpha_rew > MAX_ALPHA_REW:
            raise UserError(
                f"config key 'loss.alpha_rew' is {self.loss.alpha_rew:g}: above {MAX_ALPHA_REW:g} the reward term "
                "overflows and every generator update is skipped (the paper's runs use 100)"
            )

    def _validate_loss(self) -> None:
        L = self.loss
        if not 0 <= L.t_min < L.t_max <= 1000:
            raise UserError(f"loss.t_min={L.t_min}, loss.t_max={L.t_max}: need 0 ≤ t_min < t_max ≤ 1000")
        if L.score_normalise and L.divergence != "score":
            raise UserError("loss.score_normalise normalises the score divergence; for KL use loss.kl_normalise")
        lo, hi = L.cfg_range()
        if not 0 <= lo < hi <= 1000:
            raise UserError(f"loss.cfg_t_min={lo}, loss.cfg_t_max={hi}: need 0 ≤ cfg_t_min < cfg_t_max ≤ 1000")
        if L.cfg_own_noise() and L.cfg != "reward":
            raise UserError(
                'loss.cfg_t_min, cfg_t_max and cfg_weighting shape the CFG term of loss.cfg = "reward" (DI*-OUT); '
                f"with loss.cfg = {L.cfg!r} CFG acts inside the divergence: leave them unset"
            )
        if not 0 <= L.assistant_t_min < L.assistant_t_max <= 1000:
            raise UserError("loss.assistant_t_min/assistant_t_max: need 0 ≤ assistant_t_min < assistant_t_max ≤ 1000")

    def _validate_data(self) -> None:
        d = self.data
        _at_least_one(
            {"data.batch_size": d.batch_size, "data.grad_accum": d.grad_accum, "data.resolution": d.resolution}
        )
        if not d.prompts:
            raise UserError("config key 'data.prompts' is empty: set it to the curated prompt shards (distar curate)")

    def _validate_guard(self) -> None:
        g = self.guard
        if g.seeds == 1 or g.seeds < 0 or g.prompts < 1:
            raise UserError(
                "config keys 'guard.seeds' (0 or at least 2) and 'guard.prompts' (at least 1) are out of range"
            )
        from distar.rewards import KNOWN

        unknown = sorted(n for n in {*g.heldout, *g.max_heldout_drop} if n not in KNOWN)
        if unknown:
            raise UserError(
                f"config key 'guard.heldout' / 'guard.max_heldout_drop': unknown rewards {unknown}; "
                f"known: {', '.join(KNOWN)}"
            )

    def _validate_parallel(self) -> None:
        p = self.parallel
        if p.bf16_weight_copies and (p.mixed_precision != "bf16" or p.strategy == "fsdp"):
            raise UserError(
                "parallel.bf16_weight_copies replaces bf16 autocast's casts without FSDP: set "
                "parallel.mixed_precision=bf16 and parallel.strategy to 'none' or 'ddp' (FSDP's mixed precision "
                "makes its own bf16 copies), or parallel.bf16_weight_copies=false"
            )

    def _domains(self):
        """(key, value, lower bound, bound excluded) of every bounded numeric field."""
        yield "kimg", self.kimg, 0.0, False
        yield "loss.alpha_rew", self.loss.alpha_rew, 0.0, False
        yield "loss.alpha_cfg", self.loss.alpha_cfg, 0.0, False
        yield "loss.huber_c", self.loss.huber_c, 0.0, True
        for name in ("generator_optim", "assistant_optim"):
            o = getattr(self, name)
            yield f"{name}.lr", o.lr, 0.0, True
            yield f"{name}.eps", o.eps, 0.0, True
            yield f"{name}.weight_decay", o.weight_decay, 0.0, False
            yield f"{name}.grad_clip", o.grad_clip, 0.0, False
            yield f"{name}.warmup_steps", float(o.warmup_steps), 0.0, False
        yield "lease.stale_minutes", self.lease.stale_minutes, 0.0, True
        yield "guard.min_diversity", self.guard.min_diversity, 0.0, False


MAX_ALPHA_REW = 1e6
"""α_rew beyond this leaves bf16/fp32 gradients no headroom (the paper's largest is 100)."""

# What a resumed run may change without --allow-config-change: how long it runs, how it logs and checkpoints,
# where it reads the model cache from, how it is parallelised (DCP reshards), the lease.
RESUME_SAFE_KEYS = (
    "out",
    "steps",
    "log",
    "checkpoint",
    "lease",
    "parallel",
    "model.cache_dir",
    "model.offline",
    "guard",
)


def redact_values(value):
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v) for v in value)
    return value


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict) and key not in ("weights", "sources", "processors", "heads"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def preset_path(name: str) -> Path:
    return Path(str(resources.files("distar") / "presets" / f"{name}.toml"))


def _at_least_one(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 1:
            raise UserError(f"config key {key!r} must be at least 1, got {value}")


def _read_config_file(source: str) -> tuple[Path, dict]:
    """The file a preset name or path names, and its parsed mapping."""
    path = preset_path(source) if source in PRESETS else Path(source)
    if not path.is_file():
        raise UserError(f"--config {source!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML/JSON file")
    return path, readers.read_config_file(path, f"--config {str(path)!r}")


def load_config(source: str, overrides: list[str] = ()) -> TrainConfig:
    """A preset name or a TOML/JSON file, then `key=value` overrides, then validation."""
    path, mapping = _read_config_file(source)
    config = apply_mapping(TrainConfig(), mapping, source=str(path))
    return apply_overrides(config, list(overrides)).validate()


def resolved(source: str, overrides: list[str] = ()) -> list[tuple[str, object, str]]:
    """Every field of the config that `load_config(source, overrides)` gives, as (dotted key, value, where the value
    comes from: the override, the preset or file, or the default)."""
    from distar.config import flat_keys

    config = load_config(source, overrides)
    path, mapping = _read_config_file(source)
    in_file = {key for key, _ in flat_keys(TrainConfig(), mapping)}
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    where = f"preset {source}" if source in PRESETS else str(path)
    rows = []

    def walk(node, prefix: str) -> None:
        for f in dataclasses.fields(node):
            key, value = prefix + f.name, getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            else:
                origin = "override" if key in overridden else where if key in in_file else "default"
                rows.append((key, value, origin))

    walk(config, "")
    return rows
