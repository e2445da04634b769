"""The DI* training loop (METHOD.md §3–5), read top to bottom: build, resume, then per step
K_TA assistant updates and one generator update, checkpoints and logs.

Every random draw of step s (noise z, timesteps t, noise ε) comes from a generator seeded by
(seed, rank, s, micro-batch, purpose), and the prompts of step s from the global sample counter: the state a
resumed run needs is the weights, optimizer states, EMA, step and sample counter that the checkpoint holds,
so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distar import storage, tiny_preset
from distar.diffusion import VPSchedule
from distar.errors import UserError
from distar.losses import assistant_loss, cfg_reward_loss, generator_loss, score_distance, time_weight
from distar.models.hub import HUB_ID
from distar.models.sdxl import (
    Assistant,
    OneStepGenerator,
    PromptEncoder,
    Reference,
    SDXLConditioning,
    add_time_ids,
    decode,
    load_dmd2_unet,
    load_unet,
    load_vae,
    parse_dtype,
)
from distar.rewards import RewardSpec, WeightedReward
from distar.train import parallel
from distar.train.checkpoint import Checkpointer
from distar.train.config import OptimConfig, TrainConfig
from distar.train.data import PromptSet
from distar.train.distributed import World
from distar.train.metrics import MetricLogger, image_grid

# Purposes of the counter-based random streams.
_Z, _T, _EPS, _SAMPLES = 1, 2, 3, 4


class NonFiniteError(UserError):
    """Too many non-finite updates in a row."""


@dataclass
class Networks:
    generator: nn.Module  # OneStepGenerator, DDP-wrapped under "ddp"
    assistant: nn.Module  # Assistant, DDP-wrapped under "ddp"
    reference: Reference
    prompt_encoder: PromptEncoder | None
    vae: nn.Module
    reward: WeightedReward | None
    generator_unet: nn.Module = field(init=False)
    assistant_unet: nn.Module = field(init=False)

    def __post_init__(self):
        self.generator_unet = parallel.unwrap(self.generator).unet
        self.assistant_unet = parallel.unwrap(self.assistant).unet


def _is_state_dict_file(source: str) -> bool:
    if source.endswith((".bin", ".safetensors", ".pt", ".pth")):
        return True
    repo, sep, _ = source.partition(":")
    return bool(sep) and "://" not in source and bool(HUB_ID.match(repo))


def build_networks(config: TrainConfig, world: World, need_text_encoders: bool) -> Networks:
    """Load every network the config names, then `assemble` them."""
    m = config.model
    hub = {"cache_dir": m.cache_dir, "offline": True if m.offline else None}
    reference_source = tiny_preset.resolve(m.reference)
    ref_kwargs = {**hub, "revision": m.revision}
    reference_unet = load_unet(reference_source, dtype="fp32", **ref_kwargs)

    init = tiny_preset.resolve(m.generator_init)
    if init == "reference":
        generator_unet = copy.deepcopy(reference_unet)
    elif _is_state_dict_file(init):
        generator_unet = load_dmd2_unet(init, reference_source, dtype="fp32", **ref_kwargs)
    else:
        generator_unet = load_unet(init, dtype="fp32", **hub)
    assistant_init = tiny_preset.resolve(m.assistant_init)
    assistant = Assistant.from_reference(reference_unet, init=None if assistant_init == "reference" else assistant_init,
                                         **hub)  # fmt: skip
    prompt_encoder = None
    if need_text_encoders:
        prompt_encoder = PromptEncoder.from_pretrained(reference_source, dtype=m.text_encoder_dtype, **ref_kwargs)
    vae_source = tiny_preset.resolve(m.vae) or reference_source
    vae = load_vae(vae_source, dtype=m.vae_dtype, **(hub if m.vae else ref_kwargs))
    reward = None
    if config.reward.weights:
        r = config.reward
        tiny = tiny_preset.resolve
        specs = [
            RewardSpec(name, w, tiny(r.sources.get(name)), tiny(r.processors.get(name)), tiny(r.heads.get(name)))
            for name, w in r.weights.items()
        ]
        reward = WeightedReward.from_specs(specs, dtype=r.dtype, **hub)
    return assemble(config, world, reference_unet, generator_unet, assistant.unet, vae, reward, prompt_encoder)


def assemble(config: TrainConfig, world: World, reference_unet: nn.Module, generator_unet: nn.Module,
             assistant_unet: nn.Module, vae: nn.Module, reward: WeightedReward | None,
             prompt_encoder: PromptEncoder | None = None) -> Networks:  # fmt: skip
    """The networks as the loop uses them: weight dtypes, activation checkpointing, device, then FSDP2 or DDP.
    The trainable UNets keep fp32 weights (bf16 compute comes from autocast or FSDP's mixed precision)."""
    m, p = config.model, config.parallel
    if p.strategy == "none" and world.size > 1:
        raise UserError(f"parallel.strategy='none' runs one process, but WORLD_SIZE is {world.size}; use ddp or fsdp")
    generator_unet, assistant_unet = generator_unet.float(), assistant_unet.float()
    reference_unet = reference_unet.to(parse_dtype(m.reference_dtype))
    if p.activation_checkpointing:
        for unet in (generator_unet, assistant_unet, reference_unet):
            parallel.apply_activation_checkpointing(unet)
    generator = OneStepGenerator(generator_unet.to(world.device), t_star=m.t_star)
    assistant = Assistant(assistant_unet).to(world.device)
    reference = Reference(reference_unet.to(world.device), guidance_scale=config.loss.alpha_cfg)
    if p.strategy == "fsdp":
        mesh = parallel.mesh(world.size, world.device)
        parallel.shard_unet(generator.unet, mesh, p.mixed_precision, trainable=True)
        parallel.shard_unet(assistant.unet, mesh, p.mixed_precision, trainable=True)
        parallel.shard_unet(reference.unet, mesh, p.mixed_precision, trainable=False)
    elif p.strategy == "ddp":
        generator, assistant = parallel.replicate(generator, world.device), parallel.replicate(assistant, world.device)
    if prompt_encoder is not None:
        prompt_encoder.to(world.device, parse_dtype(m.text_encoder_dtype))
    vae = vae.to(world.device, parse_dtype(m.vae_dtype)).requires_grad_(False).eval()
    if p.vae_checkpointing:
        parallel.apply_vae_checkpointing(vae)
    if reward is not None:
        reward = reward.to(world.device, parse_dtype(config.reward.dtype)).requires_grad_(False).eval()
    return Networks(generator, assistant, reference, prompt_encoder, vae, reward)


def _stream(seed: int, rank: int, step: int, micro: int, purpose: int, update: int = 0) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, rank, step, micro, purpose, update]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def _param_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


class Trainer:
    """The loop over one config. `data` and `nets` default to what the config names; benchmarks and
    `distar plan`'s measurements pass networks built in memory from architecture configs instead."""

    def __init__(self, config: TrainConfig, world: World, data: PromptSet | None = None, nets: Networks | None = None):
        self.config = config
        self.world = world
        self.schedule = VPSchedule.sdxl()
        if data is None:
            data = PromptSet(tiny_preset.resolve(config.data.prompts), config.data.prompt_column,
                             config.data.use_embeddings)  # fmt: skip
        self.data = data
        self.nets = nets or build_networks(config, world, need_text_encoders=not self.data.has_embeddings)
        self.optimizers = {
            "generator": self._optimizer(self.nets.generator_unet, config.generator_optim),
            "assistant": self._optimizer(self.nets.assistant_unet, config.assistant_optim),
        }
        self.ema = None
        if config.ema_decay > 0:
            self.ema = {_param_name(n): p.detach().clone() for n, p in self.nets.generator_unet.named_parameters()}
        vae_factor = 2 ** (len(self.nets.vae.config.block_out_channels) - 1)
        if config.data.resolution % (vae_factor * 8):
            raise UserError(f"data.resolution={config.data.resolution} must be a multiple of {vae_factor * 8}")
        side = config.data.resolution // vae_factor
        self.latent_shape = (self.nets.generator_unet.config.in_channels, side, side)
        self.step = 0
        self.samples_seen = 0
        self.skipped = {"generator": 0, "assistant": 0}
        self.nonfinite_in_a_row = 0
        self.checkpointer = Checkpointer(config.out, world, config.checkpoint.keep_last)
        self.autocast = contextlib.nullcontext()
        if config.parallel.mixed_precision == "bf16":
            self.autocast = torch.autocast(world.device.type, dtype=torch.bfloat16)

    @staticmethod
    def _optimizer(unet: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
        params = [p for p in unet.parameters() if p.requires_grad]
        kernels = {"auto": {}, "fused": {"fused": True}, "foreach": {"foreach": True}}[o.implementation]
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                 **kernels)  # fmt: skip

    # -- state ------------------------------------------------------------------------------------

    def dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        g, a = self.nets.generator_unet, self.nets.assistant_unet
        state = {
            "generator": get_model_state_dict(g), "assistant": get_model_state_dict(a),
            "generator_optim": get_optimizer_state_dict(g, self.optimizers["generator"]),
            "assistant_optim": get_optimizer_state_dict(a, self.optimizers["assistant"]),
        }  # fmt: skip
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "samples_seen": self.samples_seen, "skipped": dict(self.skipped),
            "world_size": self.world.size, "config_digest": self.config.digest(),
        }  # fmt: skip

    @staticmethod
    def rank_state() -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def save(self) -> str:
        uri = self.checkpointer.save(self.step, self.dcp_state(), self.rank_state(), self.trainer_state(),
                                     self.config.to_dict())  # fmt: skip
        return uri

    def resume(self) -> int | None:
        """Load the newest complete checkpoint under the output URI; returns its step (None: fresh start)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        latest = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return None
        state = self.dcp_state()
        trainer_state, rank_state = self.checkpointer.load(latest, state)
        g, a = self.nets.generator_unet, self.nets.assistant_unet
        set_model_state_dict(g, state["generator"])
        set_model_state_dict(a, state["assistant"])
        set_optimizer_state_dict(g, self.optimizers["generator"], state["generator_optim"])
        set_optimizer_state_dict(a, self.optimizers["assistant"], state["assistant_optim"])
        self.step = int(trainer_state["step"])
        self.samples_seen = int(trainer_state["samples_seen"])
        self.skipped = dict(trainer_state["skipped"])
        if rank_state is not None:
            torch.set_rng_state(rank_state["torch"])
            np.random.set_state(rank_state["numpy"])
            random.setstate(rank_state["python"])
            if "cuda" in rank_state and torch.cuda.is_available():
                torch.cuda.set_rng_state(rank_state["cuda"])
        return latest

    # -- one update -----------------------------------------------------------------------------

    def _conditioning(self, batch) -> SDXLConditioning:
        res = self.config.data.resolution
        if batch.prompt_embeds is not None:
            n = len(batch.prompts)
            # Shards store fp16 (half the bytes); the networks take fp32 inputs and cast to their own dtype.
            return SDXLConditioning(batch.prompt_embeds, batch.pooled_prompt_embeds, add_time_ids(n, res, res)).to(
                self.world.device, torch.float32
            )
        return self.nets.prompt_encoder.encode(batch.prompts, res, res)

    def _noise(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=gen).to(self.world.device)

    def _timesteps(self, gen: torch.Generator, n: int, lo: int, hi: int) -> torch.Tensor:
        return torch.randint(lo, hi, (n,), generator=gen).to(self.world.device)

    def _micro_batches(self):
        d = self.config.data
        for micro in range(d.grad_accum):
            start = self.samples_seen + micro * self.world.size * d.batch_size
            batch = self.data.batch(start, self.world.rank, self.world.size, d.batch_size, self.config.seed, d.shuffle)
            yield micro, batch, self._conditioning(batch)

    def _sync(self, module: nn.Module, unet: nn.Module, last: bool):
        """Gradient sync only on the last micro-batch of an update."""
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if last else module.no_sync()
        if hasattr(unet, "set_requires_gradient_sync"):
            unet.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def assistant_update(self, k: int, batches) -> dict[str, float]:
        c, d, s = self.config, self.config.data, self.step
        total = 0.0
        for micro, batch, cond in batches:
            n = len(batch.prompts)
            with torch.no_grad(), self.autocast:
                x0 = parallel.unwrap(self.nets.generator)(
                    self._noise(_stream(c.seed, self.world.rank, s, micro, _Z, k + 1), n), cond
                )
            t = self._timesteps(_stream(c.seed, self.world.rank, s, micro, _T, k + 1), n, c.loss.assistant_t_min,
                                c.loss.assistant_t_max)  # fmt: skip
            eps = self._noise(_stream(c.seed, self.world.rank, s, micro, _EPS, k + 1), n)
            x_t = self.schedule.add_noise(x0.float(), eps, t)
            with self._sync(self.nets.assistant, self.nets.assistant_unet, micro == d.grad_accum - 1), self.autocast:
                loss = assistant_loss(self.nets.assistant(x_t, t, cond).float(), eps)
                (loss / d.grad_accum).backward()
            total += loss.item() / d.grad_accum
        norm, ok = self._apply("assistant", total, s * c.assistant_updates + k)
        return {"loss/assistant": total, "grad_norm/assistant": norm, "ok/assistant": float(ok)}

    def generator_update(self, batches) -> dict[str, float]:
        c, d, s, L = self.config, self.config.data, self.step, self.config.loss
        sums: dict[str, float] = {}

        def add(key, value):
            sums[key] = sums.get(key, 0.0) + float(value) / d.grad_accum

        assistant = parallel.unwrap(self.nets.assistant)  # frozen here: no DDP hooks, no parameter gradients
        self.nets.assistant_unet.requires_grad_(False)
        try:
            for micro, batch, cond in batches:
                n = len(batch.prompts)
                z = self._noise(_stream(c.seed, self.world.rank, s, micro, _Z), n)
                t = self._timesteps(_stream(c.seed, self.world.rank, s, micro, _T), n, L.t_min, L.t_max)
                eps = self._noise(_stream(c.seed, self.world.rank, s, micro, _EPS), n)
                last = micro == d.grad_accum - 1
                with self._sync(self.nets.generator, self.nets.generator_unet, last), self.autocast:
                    x0 = self.nets.generator(z, cond).float()
                    loss, parts = self._generator_loss(x0, t, eps, cond, batch.prompts, assistant)
                    (loss / d.grad_accum).backward()
                for key, value in parts.items():
                    add(key, value)
        finally:
            self.nets.assistant_unet.requires_grad_(True)
        norm, ok = self._apply("generator", sums["loss/generator"], s)
        return {**sums, "grad_norm/generator": norm, "ok/generator": float(ok)}

    def _generator_loss(self, x0, t, eps, cond, prompts, assistant):
        """L_G = −α_rew·r(decode(x0)) + L_div (+ the CFG reward term when CFG acts outside the divergence)."""
        L = self.config.loss
        parts = {}
        reward_loss = x0.new_zeros(())
        if self.nets.reward is not None:
            with contextlib.nullcontext() if L.alpha_rew != 0 else torch.no_grad():
                images = decode(self.nets.vae, x0)
                terms = self.nets.reward.terms(images, prompts)
                reward = self.nets.reward.combine({k: v.float() for k, v in terms.items()})
            parts["reward"] = reward.mean().item()
            parts.update({f"reward/{k}": v.float().mean().item() for k, v in terms.items()})
            if L.alpha_rew != 0:
                reward_loss = -L.alpha_rew * reward.mean()
        weight = time_weight(self.schedule, t, L.weighting, x0)
        seen = {}

        def eps_assistant(x_t, tt):
            seen["assistant"] = out = assistant(x_t, tt, cond).float()
            return out

        guidance = L.alpha_cfg if L.cfg == "divergence" else 1.0

        def eps_reference(x_t, tt):
            if guidance == self.nets.reference.guidance_scale:
                out = self.nets.reference(x_t, tt, cond)
            else:
                out = Reference(self.nets.reference.unet, guidance)(x_t, tt, cond)
            seen["reference"] = out = out.float()
            return out

        div_loss = generator_loss(x0, t, eps, eps_assistant, eps_reference, self.schedule, divergence=L.divergence,
                                  distance=L.distance, huber_c=L.huber_c, form=L.form, weight=weight)  # fmt: skip
        loss = reward_loss + div_loss
        with torch.no_grad():
            sigma = self.schedule.sigma(t, x0)
            y = -(seen["assistant"] - seen["reference"]) / sigma
            parts["divergence"] = (weight * score_distance(y, L.distance, L.huber_c)).mean().item()
        if L.cfg == "reward" and L.alpha_cfg != 1.0:
            x_t = self.schedule.add_noise(x0, eps, t)
            with torch.no_grad():
                eps_uncond, eps_cond = self.nets.reference.branches(x_t.detach(), t, cond)
            cfg_loss = cfg_reward_loss(x_t, t, eps_cond.float(), eps_uncond.float(), self.schedule, L.alpha_cfg, weight)
            loss = loss + cfg_loss
            parts["loss/cfg_reward"] = cfg_loss.item()
        parts.update({"loss/generator": loss.item(), "loss/divergence": div_loss.item(),
                      "loss/reward": reward_loss.item()})  # fmt: skip
        return loss, parts

    def _apply(self, network: str, loss_value: float, update: int) -> tuple[float, bool]:
        """Clip, check that the loss and the gradient are finite on every rank, then step or skip."""
        o = self.config.generator_optim if network == "generator" else self.config.assistant_optim
        unet = self.nets.generator_unet if network == "generator" else self.nets.assistant_unet
        optimizer = self.optimizers[network]
        params = [p for p in unet.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        ok = self.world.all_true(math.isfinite(loss_value)) and math.isfinite(norm)
        if ok:
            scale = min(1.0, (update + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
            for group in optimizer.param_groups:
                group["lr"] = o.lr * scale
            optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.skipped[network] += 1
            self.nonfinite_in_a_row += 1
        optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_in_a_row >= self.config.max_nonfinite:
            latest = self.checkpointer.latest()
            where = f"the last complete checkpoint is step {latest}" if latest is not None else "no checkpoint yet"
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} non-finite updates in a row (last: {network} at step {self.step}, "
                f"loss {loss_value}, gradient norm {norm}); {where}. Lower the learning rate or loss.alpha_rew, "
                f"or raise max_nonfinite"
            )
        return norm, ok

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        for name, p in self.nets.generator_unet.named_parameters():
            self.ema[_param_name(name)].lerp_(p.detach(), 1.0 - decay)

    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks and micro-batches."""
        c = self.config.data
        return self.world.size * c.batch_size * c.grad_accum

    def train_step(self) -> dict[str, float]:
        """One DI* iteration: K_TA assistant updates, then one generator update and the EMA; advances the step
        and the sample counter."""
        c = self.config
        batches = list(self._micro_batches())
        values: dict[str, float] = {}
        for k in range(c.assistant_updates):
            for key, v in self.assistant_update(k, batches).items():
                values[key] = values.get(key, 0.0) + v / c.assistant_updates
        values.update(self.generator_update(batches))
        if self.ema is not None and values["ok/generator"]:
            self._update_ema()
        self.step += 1
        self.samples_seen += self.global_batch
        return values

    # -- samples --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The fixed sample grid: the first log.sample_prompts prompts, fixed noise; images and their reward."""
        k = min(self.config.log.sample_prompts, len(self.data))
        batch = self.data.batch(0, 0, 1, k, self.config.seed, shuffle=False)
        cond = self._conditioning(batch)
        z = self._noise(_stream(self.config.seed, 0, 0, 0, _SAMPLES), k)
        with self.autocast:
            x0 = parallel.unwrap(self.nets.generator)(z, cond).float()
            images = decode(self.nets.vae, x0).float()
            values = {}
            if self.nets.reward is not None:
                terms = self.nets.reward.terms(images, batch.prompts)
                r = self.nets.reward.combine({k: v.float() for k, v in terms.items()})
                values = {
                    "eval/reward": r.mean().item(),
                    **{f"eval/reward/{n}": v.float().mean().item() for n, v in terms.items()},
                }
        return images.cpu(), values

    # -- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict:
        c, world = self.config, self.world
        resumed = self.resume()
        if world.is_main:
            where = f"resuming from {self.checkpointer.uri(resumed)} (step {resumed})" if resumed else "starting fresh"
            print(f"distar train: {where}; {c.steps} steps, world size {world.size}, config {c.digest()}", flush=True)
            fs, path = storage.filesystem(c.out)
            fs.makedirs(path, exist_ok=True)
            fs.pipe_file(f"{path.rstrip('/')}/config.json", json.dumps(c.to_dict(), indent=2).encode())
        logger = MetricLogger(c.out, world.is_main, c.log.tensorboard, resume_step=self.step)
        progress = None
        if world.is_main and c.log.progress:
            from tqdm import tqdm

            progress = tqdm(total=c.steps, initial=self.step, desc="distar train", dynamic_ncols=True)
        last_eval: dict[str, float] = {}
        saved_at = self.step if resumed is not None else None
        try:
            while self.step < c.steps:
                started = time.perf_counter()
                values = self.train_step()
                elapsed = time.perf_counter() - started
                if self.step % c.log.every == 0 or self.step == c.steps:
                    values = world.mean({k: v for k, v in values.items() if not k.startswith("ok/")})
                    values.update({
                        "images_per_s": self.global_batch / elapsed, "step_time_s": elapsed,
                        "skipped/generator": self.skipped["generator"], "skipped/assistant": self.skipped["assistant"],
                        "lr/generator": self.optimizers["generator"].param_groups[0]["lr"],
                        "lr/assistant": self.optimizers["assistant"].param_groups[0]["lr"],
                        "peak_memory_gb": _peak_memory_gb(world.device),
                    })  # fmt: skip
                    logger.log(self.step, values)
                if self.step % c.log.sample_every == 0 or self.step == c.steps:
                    images, last_eval = self.sample()
                    logger.log(self.step, last_eval)
                    logger.images(self.step, image_grid(images))
                if self.step % c.checkpoint.every == 0 or self.step == c.steps:
                    self.save()
                    saved_at = self.step
                    logger.flush()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{values.get('reward', float('nan')):.4g}",
                                         div=f"{values.get('divergence', float('nan')):.4g}")  # fmt: skip
            if saved_at != self.step:
                self.save()
        finally:
            if progress is not None:
                progress.close()
            logger.close()
        summary = {
            "step": self.step, "samples_seen": self.samples_seen, "skipped": self.skipped,
            "checkpoint": self.checkpointer.uri(self.step), "config_digest": c.digest(), **last_eval,
        }  # fmt: skip
        if world.is_main:
            fs, path = storage.filesystem(c.out)
            fs.pipe_file(f"{path.rstrip('/')}/summary.json", json.dumps(summary, indent=2).encode())
        return {**summary, "rank": world.rank}


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
