"""The DI* method (docs/METHOD.md §3–5): the assistant's and the generator's loss-and-backward on a step's
micro-batches, and the random streams they draw from. No optimizer, no logging, no checkpoints: the loop
(trainer.py) owns those.

Every random draw of step s (noise z, timesteps t, noise ε) comes from a generator seeded by
(seed, rank, s, micro-batch, purpose, update), and the prompts of step s from the global sample counter, so a
resumed run draws exactly what the interrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch

from distar.backbones import Conditioning
from distar.losses import assistant_loss, generator_objective, time_weight
from distar.train import parallel, precision
from distar.train.config import TrainConfig
from distar.train.data import PromptBatch, PromptSet
from distar.train.distributed import World
from distar.train.networks import Networks

# Purposes of the counter-based random streams.
Z, T, EPS, SAMPLES, CFG_T, CFG_EPS = 1, 2, 3, 4, 5, 6
WARMUP_UPDATES = 1 << 20  # the update index of warm-up update k is WARMUP_UPDATES + k: its own streams

MicroBatch = tuple[int, PromptBatch, Conditioning]


def stream(seed: int, rank: int, step: int, micro: int, purpose: int, update: int = 0) -> torch.Generator:
    entropy = np.random.SeedSequence([seed, rank, step, micro, purpose, update]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def grad_rms(loss: torch.Tensor, x0: torch.Tensor) -> float:
    """The RMS over elements of ∂loss/∂x0 per sample, averaged over samples (one backward pass to x0)."""
    (grad,) = torch.autograd.grad(loss, x0, retain_graph=True)
    # the losses are batch means: n · grad is each sample's own gradient
    return (x0.shape[0] * grad.detach().float()).flatten(1).pow(2).mean(dim=1).sqrt().mean().item()


def reward_divergence_balance(reward_loss: torch.Tensor, divergence_loss: torch.Tensor, x0: torch.Tensor) -> dict:
    """The per-sample RMS of ∂(α_rew·r)/∂x0 and of ∂L_div/∂x0, and their ratio (`balance/reward_to_divergence`):
    above 1 the reward moves the samples more than the divergence holds them. Costs two extra backward passes from
    the loss to x0 (through the reward, the VAE decoder, the assistant and the reference, not the generator), so
    the trainer asks for it on log steps only."""
    r, d = grad_rms(reward_loss, x0), grad_rms(divergence_loss, x0)
    return {"balance/reward_grad_rms": r, "balance/divergence_grad_rms": d,
            "balance/reward_to_divergence": r / d if d > 0 else float("inf")}  # fmt: skip


class DIStar:
    """The two updates of a DI* iteration over prebuilt networks; each leaves gradients on its network."""

    def __init__(self, config: TrainConfig, world: World, nets: Networks, data: PromptSet, latent_shape: tuple):
        self.config, self.world, self.nets, self.data = config, world, nets, data
        self.latent_shape = latent_shape
        self.backbone = nets.generator.backbone
        self.schedule = self.backbone.training_schedule(config.loss, *latent_shape[-2:])
        self.autocast = contextlib.nullcontext()
        if config.parallel.mixed_precision == "bf16":
            self.autocast = torch.autocast(world.device.type, dtype=torch.bfloat16)
        self.weight_copies = config.parallel.bf16_weight_copies

    def frozen_generator(self):
        """The K_TA assistant updates sample from a generator that does not change until they are done: with
        `parallel.bf16_weight_copies`, its bf16 compute weights are made once for all of them."""
        return precision.frozen_bf16_weights(self.nets.generator_unet, self.weight_copies)

    # -- inputs -------------------------------------------------------------------------------------

    def conditioning(self, batch: PromptBatch) -> Conditioning:
        res = self.config.data.resolution
        if batch.embeddings is not None:
            # Shards store fp16 (half the bytes); the networks take fp32 inputs and cast to their own dtype.
            cond = self.backbone.conditioning_from_embeddings(batch.embeddings, res, res)
            return cond.to(self.world.device, torch.float32)
        return self.nets.prompt_encoder.encode(batch.prompts, res, res)

    def noise(self, gen: torch.Generator, n: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=gen).to(self.world.device)

    def timesteps(self, gen: torch.Generator, n: int, lo, hi) -> torch.Tensor:
        return self.schedule.sample_t(n, *self.backbone.config_times(lo, hi), gen).to(self.world.device)

    def micro_batches(self, samples_seen: int) -> list[MicroBatch]:
        """The step's micro-batches of this rank, from the global sample counter."""
        d, w = self.config.data, self.world
        out = []
        for micro in range(d.grad_accum):
            start = samples_seen + micro * w.size * d.batch_size
            batch = self.data.batch(start, w.rank, w.size, d.batch_size, self.config.seed, d.shuffle)
            out.append((micro, batch, self.conditioning(batch)))
        return out

    # -- the assistant: denoising score matching on generator samples (§5) ----------------------------

    def assistant_backward(self, step: int, k: int, batches: Iterable[MicroBatch]) -> dict[str, torch.Tensor]:
        """The k-th assistant update of `step`: L_TA on x0 = sg(g_θ(z, c)), gradients accumulated over
        micro-batches (reduced across ranks on the last). The values stay on the device (no host sync): the
        loop reads them on log steps."""
        c, d, rank = self.config, self.config.data, self.world.rank
        total = torch.zeros((), device=self.world.device)
        for micro, batch, cond in batches:
            n = len(batch.prompts)
            with torch.no_grad(), self.autocast:
                x0 = self.nets.generator(self.noise(stream(c.seed, rank, step, micro, Z, k + 1), n), cond)
            t = self.timesteps(
                stream(c.seed, rank, step, micro, T, k + 1), n, c.loss.assistant_t_min, c.loss.assistant_t_max
            )
            eps = self.noise(stream(c.seed, rank, step, micro, EPS, k + 1), n)
            x_t = self.schedule.add_noise(x0.float(), eps, t)
            last = micro == d.grad_accum - 1
            with parallel.gradient_sync(self.nets.assistant_train, last), self.autocast:
                eps_hat = self.nets.assistant_train(x_t, t, cond).float()
                loss = assistant_loss(eps_hat, eps, self.schedule.matching_weight(t, eps))
                (loss / d.grad_accum).backward()
            total += loss.detach() / d.grad_accum
        return {"loss/assistant": total}

    # -- the generator: L_G = −α_rew·r + L_div (§4) -------------------------------------------------

    def generator_backward(self, step: int, batches: Iterable[MicroBatch], balance: bool = False) -> dict:
        """The generator update of `step`: L_G's gradient accumulated over micro-batches; the assistant is
        frozen (no parameter gradients, no DDP hooks, and with `parallel.bf16_weight_copies` bf16 weights made
        once) while the loss backpropagates through its input. Values as device tensors, the balance's as floats."""
        sums: dict = {}
        self.nets.freeze_assistant(True)
        try:
            with precision.frozen_bf16_weights(self.nets.assistant_unet, self.weight_copies):
                self._generator_micro_batches(step, batches, balance, sums)
        finally:
            self.nets.freeze_assistant(False)
        return sums

    def _generator_micro_batches(self, step: int, batches: Iterable[MicroBatch], balance: bool, sums: dict) -> None:
        c, d, L, rank = self.config, self.config.data, self.config.loss, self.world.rank
        for micro, batch, cond in batches:
            n = len(batch.prompts)
            z = self.noise(stream(c.seed, rank, step, micro, Z), n)
            t = self.timesteps(stream(c.seed, rank, step, micro, T), n, L.t_min, L.t_max)
            eps = self.noise(stream(c.seed, rank, step, micro, EPS), n)
            cfg_noise = None
            if L.cfg == "reward" and L.cfg_own_noise():  # DI*-OUT's CFG term at its own times and noise
                t_cfg = self.timesteps(stream(c.seed, rank, step, micro, CFG_T), n, *L.cfg_range())
                cfg_noise = (t_cfg, self.noise(stream(c.seed, rank, step, micro, CFG_EPS), n))
            last = micro == d.grad_accum - 1
            with parallel.gradient_sync(self.nets.generator_train, last), self.autocast:
                x0 = self.nets.generator_train(z, cond).float()
                loss, parts = self.generator_loss(x0, t, eps, cond, batch.prompts, balance, cfg_noise)
                (loss / d.grad_accum).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / d.grad_accum

    def generator_loss(
        self, x0, t, eps, cond, prompts, balance: bool = False, cfg_noise=None
    ) -> tuple[torch.Tensor, dict]:
        """L_G on one micro-batch and the values it logs (detached device tensors); with `balance`, also how hard
        the reward pulls on x0 against the divergence (`reward_divergence_balance`) and the CFG term's pull
        (floats: log steps only). cfg_noise = (t, ε): DI*-OUT's CFG term at its own times (None: the
        divergence's)."""
        L, nets = self.config.loss, self.nets
        parts: dict = {}
        reward = None
        if nets.reward is not None:
            with contextlib.nullcontext() if L.alpha_rew != 0 else torch.no_grad():
                terms = nets.reward.terms(self.backbone.decode(nets.vae, x0), prompts)
                reward = nets.reward.combine({k: v.float() for k, v in terms.items()})
            parts["reward"] = reward.detach().mean()
            parts.update({f"reward/{k}": v.detach().float().mean() for k, v in terms.items()})
        scale = L.guidance_scale()
        guidance = scale if L.cfg == "divergence" else 1.0
        objective = generator_objective(
            x0,
            t,
            eps,
            lambda x_t, tt: nets.assistant(x_t, tt, cond).float(),
            lambda x_t, tt: nets.reference(x_t, tt, cond, guidance_scale=guidance).float(),
            self.schedule,
            reward=reward,
            alpha_rew=L.alpha_rew,
            reference_branches=(lambda x_t, tt: [e.float() for e in nets.reference.branches(x_t, tt, cond)])
            if L.cfg == "reward"
            else None,
            alpha_cfg=scale,
            weight=time_weight(self.schedule, t, L.weighting, x0),
            cfg_noise=None
            if cfg_noise is None
            else (*cfg_noise, time_weight(self.schedule, cfg_noise[0], L.cfg_weighting or L.weighting, x0)),
            **L.loss_kwargs(),
        )
        parts["divergence"] = objective.divergence.detach().mean()
        if L.distance == "pseudo_huber":  # ≫ 1: d' is a unit vector, c no longer shapes the gradient
            parts["divergence/y_over_c"] = objective.y_norm.mean() / L.huber_c
        if balance and reward is not None and L.alpha_rew != 0:
            parts.update(reward_divergence_balance(objective.reward_loss, objective.divergence_loss, x0))
        if objective.cfg_loss is not None:
            parts["loss/cfg_reward"] = objective.cfg_loss.detach()
            if balance:  # against balance/divergence_grad_rms: how hard DI*-OUT's CFG term pulls on x0
                parts["balance/cfg_grad_rms"] = grad_rms(objective.cfg_loss, x0)
        parts.update(
            {
                "loss/generator": objective.loss.detach(),
                "loss/divergence": objective.divergence_loss.detach(),
                "loss/reward": objective.reward_loss.detach(),
            }
        )
        return objective.loss, parts

    @torch.no_grad()
    def guard_images(self, prompts: int, seeds: int) -> tuple[torch.Tensor, list[str]]:
        """`seeds` images for each of the first `prompts` prompts, from fixed noise: (prompts·seeds, 3, H, W), with
        the prompt of each image (seed-major within a prompt)."""
        k = min(prompts, len(self.data))
        batch = self.data.batch(0, 0, 1, k, self.config.seed, shuffle=False)
        images = []
        for s in range(seeds):
            cond = self.conditioning(batch)
            z = self.noise(stream(self.config.seed, 0, 0, s, SAMPLES, update=1 + s), k)
            with self.autocast:
                images.append(self.backbone.decode(self.nets.vae, self.nets.generator(z, cond).float()).float().cpu())
        stacked = torch.stack(images, dim=1)  # (k, seeds, 3, H, W)
        return stacked.flatten(0, 1), [p for p in batch.prompts for _ in range(seeds)]

    # -- samples --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self) -> tuple[torch.Tensor, dict[str, float]]:
        """The fixed sample grid: the first log.sample_prompts prompts, fixed noise; images and their reward."""
        k = min(self.config.log.sample_prompts, len(self.data))
        batch = self.data.batch(0, 0, 1, k, self.config.seed, shuffle=False)
        cond = self.conditioning(batch)
        z = self.noise(stream(self.config.seed, 0, 0, 0, SAMPLES), k)
        with self.autocast:
            x0 = self.nets.generator(z, cond).float()
            images = self.backbone.decode(self.nets.vae, x0).float()
            values = {}
            if self.nets.reward is not None:
                terms = self.nets.reward.terms(images, batch.prompts)
                r = self.nets.reward.combine({k: v.float() for k, v in terms.items()})
                values = {
                    "eval/reward": r.mean().item(),
                    **{f"eval/reward/{n}": v.float().mean().item() for n, v in terms.items()},
                }
        return images.cpu(), values
