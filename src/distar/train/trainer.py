"""The DI* training loop, read top to bottom: build, resume, then per step K_TA assistant updates and one
generator update (the method: di_star.py), each followed by a checked optimizer step; EMA, samples, logs and
checkpoints (the state: checkpoint.TrainState).

The state a resumed run needs is the weights, optimizer states, EMA, step and sample counter that the checkpoint
holds; the random streams are counter-based (di_star.stream), so a resumed run continues exactly where the
interrupted one stopped.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from distar import backbones, sources, storage
from distar.errors import UserError
from distar.stop import Preempted, StopSignals
from distar.train import parallel
from distar.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    ModelState,
    OptimizerState,
    TensorsState,
    TrainState,
    read_config,
)
from distar.train.config import OptimConfig, TrainConfig
from distar.train.data import PromptSet
from distar.train.di_star import WARMUP_UPDATES, DIStar
from distar.train.distributed import World
from distar.train.guard import Guard
from distar.train.lease import Lease, LeaseHeldError, LeaseLost
from distar.train.metrics import MetricLogger, image_grid
from distar.train.networks import Networks, assemble, build_networks, check_resolution
from distar.train.progress import ProgressReporter

__all__ = ["NonFiniteError", "Trainer", "assemble", "build_networks"]


# The last logged value of each of these goes into summary.json["final"]: the train step's Metrics artifact.
FINAL_METRICS = ("reward", "divergence", "loss/generator", "loss/assistant", "images_per_s", "step_time_s")


class NonFiniteError(UserError):
    """Too many non-finite updates in a row."""


class Trainer:
    """The loop over one config. `data` and `nets` default to what the config names; benchmarks and
    `distar plan`'s measurements pass networks built in memory from architecture configs instead."""

    def __init__(self, config: TrainConfig, world: World, data: PromptSet | None = None, nets: Networks | None = None):
        self.config = config
        self.world = world
        if data is None:
            columns = backbones.get(config.model.backbone).embedding_columns
            d = config.data
            data = PromptSet(sources.local(d.prompts), d.prompt_column, d.use_embeddings, columns)
        self.data = data
        self.nets = nets or build_networks(config, world, need_text_encoders=not self.data.has_embeddings)
        self.optimizers = {
            "generator": self._optimizer(self.nets.generator_unet, config.generator_optim),
            "assistant": self._optimizer(self.nets.assistant_unet, config.assistant_optim),
        }
        self.ema = None
        if config.ema_decay > 0:  # of what trains: every weight, or a LoRA generator's adapters
            self.ema = {
                parallel.param_name(n): p.detach().clone()
                for n, p in self.nets.generator_unet.named_parameters()
                if p.requires_grad
            }
        backbone = self.nets.generator.backbone
        vae_factor = backbone.vae_factor(dict(self.nets.vae.config))
        # networks built in memory (benchmarks, plan)
        check_resolution(config.data.resolution, vae_factor, backbone.latent_multiple)
        side = config.data.resolution // vae_factor
        self.latent_shape = (backbone.latent_channels(dict(self.nets.generator_unet.config)), side, side)
        self.method = DIStar(config, world, self.nets, self.data, self.latent_shape)
        self.steps = config.total_steps(world.size)
        self.counters = {"step": 0, "samples_seen": 0, "skipped": {"generator": 0, "assistant": 0}}
        # skips not yet counted (device tensors, `settle`), each network's non-finite updates in a row (an assistant
        # that updates must not hide a generator that never does), and the last update
        zero = torch.zeros((), dtype=torch.long, device=world.device)
        self._pending = {"generator": zero.clone(), "assistant": zero.clone(), "last": ""}
        self._pending |= {"in_a_row/generator": zero.clone(), "in_a_row/assistant": zero.clone()}
        self.checkpointer = Checkpointer(config.out, world, config.checkpoint.keep_last)
        self.state = self._train_state()
        self.guard = Guard(config, world, self.method)

    @staticmethod
    def _optimizer(unet: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
        params = [p for p in unet.parameters() if p.requires_grad]
        implementation = o.implementation
        if implementation == "auto":  # fused skips a non-finite update on the device: no host read per update
            fusable = all(p.device.type in ("cuda", "cpu") and p.dtype.is_floating_point for p in params)
            implementation = "fused" if fusable else "foreach"
        kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}}[implementation]
        return torch.optim.AdamW(
            params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, **kernels
        )

    def _train_state(self) -> TrainState:
        g, a = self.nets.generator_unet, self.nets.assistant_unet
        parts = {
            "generator": ModelState(g, trainable_only=self.nets.lora_generator),
            "assistant": ModelState(a, trainable_only=self.nets.lora_assistant),
            "generator_optim": OptimizerState(g, self.optimizers["generator"]),
            "assistant_optim": OptimizerState(a, self.optimizers["assistant"]),
        }
        if self.ema is not None:
            parts["ema"] = TensorsState(self.ema)
        return TrainState(parts, self.counters, self.world.size, self.config.digest())

    # The counters live in the train state; these name them for the loop.
    step = property(lambda self: self.counters["step"])
    samples_seen = property(lambda self: self.counters["samples_seen"])
    schedule = property(lambda self: self.method.schedule)
    autocast = property(lambda self: self.method.autocast)

    def save(self) -> str:
        self.settle()  # the skip counters go into the checkpoint
        self._check_lease()
        return self.checkpointer.save(self.step, self.state, self.config.to_dict())

    def resume(self) -> int | None:
        """Load the newest complete checkpoint under the output URI that verifies; returns its step (None: fresh
        start). A checkpoint that does not verify is named and skipped for the one before it; when none verifies
        the run stops rather than start over on top of them."""
        if not self.config.checkpoint.resume:
            return None
        steps = self.checkpointer.complete_steps()
        refused = []
        for step in reversed(steps):
            try:
                self.checkpointer.load(step, self.state)
                error = None
            except CheckpointError as err:
                error = str(err)
            # a file that fails on one rank only (its rank state) fails the checkpoint on all: they load one step
            error = next((e for e in self.world.gather(error) if e is not None), None)
            if error is not None:
                refused.append(error)
                if self.world.is_main:
                    print(
                        f"distar train: warning: {error}\n  falling back to the previous checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            return step
        if refused:
            raise CheckpointError(
                f"no checkpoint under {self.checkpointer.root} verifies ({len(refused)} tried); move them away to "
                f"start over, or restore them:\n" + "\n".join(refused)
            )
        return None

    # -- one iteration --------------------------------------------------------------------------

    def assistant_update(self, k: int, batches) -> dict:
        values = self.method.assistant_backward(self.step, k, batches)
        norm, ok = self._apply("assistant", values["loss/assistant"], self.step * self.config.assistant_updates + k)
        return {**values, "grad_norm/assistant": norm, "ok/assistant": ok}

    def assistant_warmup(self) -> dict[str, float]:
        """`assistant_warmup` assistant-only updates on the first step's prompts, before any generator update."""
        n = self.config.assistant_warmup
        batches = self.method.micro_batches(self.samples_seen)
        total = torch.zeros((), device=self.world.device)
        with self.method.frozen_generator():
            for k in range(n):
                values = self.method.assistant_backward(self.step, WARMUP_UPDATES - 1 + k, batches)
                self._apply("assistant", values["loss/assistant"], k)
                total += values["loss/assistant"] / n
        self.settle()
        return {"warmup/loss/assistant": total.item(), "warmup/updates": float(n)}

    def generator_update(self, batches, balance: bool = False) -> dict:
        values = self.method.generator_backward(self.step, batches, balance=balance)
        norm, ok = self._apply("generator", values["loss/generator"], self.step)
        return {**values, "grad_norm/generator": norm, "ok/generator": ok}

    def _apply(self, network: str, loss: torch.Tensor, update: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, check that the loss and the gradient are finite on every rank, then step or skip; returns the
        gradient norm and the verdict as device tensors.

        Fused AdamW skips on the device (its kernel's found_inf input, as GradScaler drives it), so an update
        needs no host sync and the skip counters are read on log and checkpoint steps (`settle`); the other
        implementations read the verdict here, once per update."""
        o = self.config.generator_optim if network == "generator" else self.config.assistant_optim
        unet = self.nets.generator_unet if network == "generator" else self.nets.assistant_unet
        optimizer = self.optimizers[network]
        norm = parallel.clip_grad_norm([p for p in unet.parameters() if p.grad is not None], o.grad_clip)
        ok = self.world.all_finite(torch.as_tensor(loss, device=norm.device), norm)
        scale = min(1.0, (update + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        for group in optimizer.param_groups:
            group["lr"] = o.lr * scale
        fused = bool(optimizer.defaults.get("fused"))
        if fused:
            optimizer.found_inf = (~ok).float()
            optimizer.step()
        elif ok.item():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._pending[network] += ~ok
        self._pending[f"in_a_row/{network}"] = (self._pending[f"in_a_row/{network}"] + 1) * ~ok
        self._pending["last"] = f"{network} at step {self.step}"
        if not fused:
            self.settle()  # the verdict is on the host already: counters and the abort as of this update
        return norm, ok

    def skipped(self) -> dict[str, int]:
        """Updates skipped so far per network (settles the counts kept on the device: one host read)."""
        return dict(self.settle()["skipped"])

    def settle(self) -> dict:
        """Move the skip counts kept on the device into the counters (one host sync), and abort after
        max_nonfinite non-finite updates in a row. Returns the counters."""
        p = self._pending
        counts = [p["generator"], p["assistant"], p["in_a_row/generator"], p["in_a_row/assistant"]]
        skipped_g, skipped_a, *in_a_row = torch.stack(counts).tolist()
        in_a_row = max(in_a_row)
        self.counters["skipped"]["generator"] += int(skipped_g)
        self.counters["skipped"]["assistant"] += int(skipped_a)
        p["generator"].zero_()
        p["assistant"].zero_()
        if in_a_row >= self.config.max_nonfinite:
            latest = self.checkpointer.latest()
            where = f"the last complete checkpoint is step {latest}" if latest is not None else "no checkpoint yet"
            raise NonFiniteError(
                f"{int(in_a_row)} non-finite updates in a row (last: {p['last']}); {where}. Lower the learning "
                f"rate or loss.alpha_rew, or raise max_nonfinite"
            )
        return self.counters

    @torch.no_grad()
    def _update_ema(self, ok: torch.Tensor) -> None:
        """EMA ← EMA + (1 − decay)·(θ − EMA) after an update that was applied; a skipped update (`ok` false)
        moves nothing. The verdict stays on the device: the weight is (1 − decay)·ok."""
        weight = ok.to(torch.float32) * (1.0 - self.config.ema_decay)
        for name, p in self.nets.generator_unet.named_parameters():
            if p.requires_grad:
                ema = self.ema[parallel.param_name(name)]
                ema.lerp_(p.detach(), weight.to(ema.device, ema.dtype))

    @property
    def global_batch(self) -> int:
        """Samples per step over all ranks and micro-batches."""
        c = self.config.data
        return self.world.size * c.batch_size * c.grad_accum

    def train_step(self) -> dict[str, float]:
        """One DI* iteration: K_TA assistant updates, then one generator update and the EMA; advances the step
        and the sample counter."""
        c = self.config
        batches = self.method.micro_batches(self.samples_seen)
        values: dict = {}
        with self.method.frozen_generator():
            for k in range(c.assistant_updates):
                for key, v in self.assistant_update(k, batches).items():
                    values[key] = values.get(key, 0.0) + v / c.assistant_updates
        upcoming = self.step + 1  # the balance is measured on log steps only (its extra cost: di_star)
        values.update(self.generator_update(batches, balance=upcoming % c.log.every == 0 or upcoming == self.steps))
        if self.ema is not None:
            self._update_ema(values["ok/generator"])
        self.counters["step"] += 1
        self.counters["samples_seen"] += self.global_batch
        return values

    def sample(self) -> tuple[torch.Tensor, dict[str, float]]:
        return self.method.sample()

    def _write_report(self) -> None:
        """{out}/report.html from the logs; a failure to draw it is reported, never fatal to the run."""
        from distar.train import report

        try:
            report.render(self.config.out, self.config.guard, self.guard.baseline)
        except Exception as err:  # the report is a view of the logs, which are written already
            print(f"distar train: warning: the training report was not written ({err!r})", file=sys.stderr)

    # -- the loop -------------------------------------------------------------------------------

    def _hold_lease(self) -> Lease | None:
        """Rank 0 takes the output's lease; every rank raises the same error when another trainer holds it."""
        lease = Lease(self.config.out, self.config.lease.stale_minutes, self.config.lease.take_over)
        self.world.check_on_main(lease.acquire, (LeaseHeldError,))
        return lease if self.world.is_main else None

    lease: Lease | None = None  # rank 0's, while `fit` runs

    def _check_lease(self) -> None:
        """Before a write into the run: every rank stops (LeaseLost, exit 75) once the lease names another
        trainer, which took the run over while this one was paused or cut off."""
        try:
            self.world.check_on_main(self.lease.check if self.lease is not None else lambda: None, (LeaseLost,))
        except LeaseLost:
            self.lease = None  # not ours: nothing more is written, the report and the release included
            raise

    def _check_config(self, allow_change: bool) -> None:
        """Refuse to resume with a config that differs from the newest checkpoint's beyond RESUME_SAFE_KEYS."""
        latest = self.checkpointer.latest() if self.config.checkpoint.resume else None
        if latest is None:
            return
        try:
            saved = read_config(self.checkpointer.uri(latest))
        except (FileNotFoundError, ValueError):
            return  # the checkpoint's own verification names what is wrong with it
        changed = self.config.changed_keys(saved)
        if changed and not allow_change:
            raise UserError(
                f"the config differs from the one checkpoint step {latest} was trained with, in: {', '.join(changed)}. "
                f"Resume with the same settings, or pass --allow-config-change to continue with the new ones"
            )
        if changed and self.world.is_main:
            print(f"distar train: resuming with changed {', '.join(changed)} (--allow-config-change)", flush=True)

    def fit(self, allow_config_change: bool = False) -> dict:
        """Train to `steps`: check the config against the checkpoint's, take the lease, resume, loop; on SIGTERM or
        SIGINT finish the step in flight, write a complete checkpoint and raise Preempted."""
        c, world = self.config, self.world
        self._check_config(allow_config_change)
        self.lease = self._hold_lease()
        try:
            with StopSignals() as stop:
                summary = self._fit(stop)
            self._check_lease()
        finally:  # a process that gets here writes nothing more; only a killed one leaves its lease to go stale
            if world.is_main and self.lease is not None:
                self._write_report()
            if self.lease is not None:
                self.lease.release()
            self.lease = None
        if world.is_main:
            fs, path = storage.filesystem(c.out)
            storage.write_json(fs, f"{path.rstrip('/')}/summary.json", summary)
        return {**summary, "rank": world.rank}

    def _fit(self, stop: StopSignals) -> dict:
        """The loop: per step one iteration, then its log, sample and checkpoint steps where they fall. Between
        them nothing is read back from the device: the values, the skip counts and (with several processes) the
        stop signal are read on log and checkpoint steps."""
        c, world = self.config, self.world
        loop = self._start()
        try:
            while self.step < self.steps:
                started = time.perf_counter()
                values = self.train_step()
                elapsed = time.perf_counter() - started
                final = self.step == self.steps
                logged = self.step % c.log.every == 0 or final
                if logged:
                    self._log_step(loop, values, elapsed)
                if self.step % c.log.sample_every == 0 or final:
                    self._sample_step(loop)
                checkpointed = self.step % c.checkpoint.every == 0 or final or bool(loop.stopped_by)
                if checkpointed:
                    self._checkpoint_step(loop)
                if loop.stopped_by:
                    break
                loop.advance()
                # One process reads its flag after every step; several agree on it (an all-reduce, read on the
                # host) on log and checkpoint steps only, so that common steps never wait for the device.
                agree = logged or checkpointed or world.size == 1
                if agree and world.any_true(stop.received is not None):
                    self._preempt(loop, stop)  # every rank stops after the same step
            self.settle()
            self._check_trained(loop)
            if loop.saved_at != self.step:
                self.save()
            if loop.reporter is not None:
                loop.reporter.finish(self.step, loop.last_values)
        finally:
            loop.close()
        return self._summary(loop)

    def _check_trained(self, loop: _Loop) -> None:
        """A run in which the generator took steps but applied none of them trained nothing: it fails, naming the
        skips, instead of exiting 0 with checkpoints of its initialisation."""
        steps = self.step - loop.first_step
        skipped = self.counters["skipped"]["generator"] - loop.first_skipped
        if steps > 0 and skipped >= steps:
            raise NonFiniteError(
                f"every generator update of this run was skipped ({skipped} of {steps}, non-finite loss or gradient): "
                f"it trained nothing. Lower loss.alpha_rew or the learning rate, and check the reward weights"
            )

    def _start(self) -> _Loop:
        """Resume (or start fresh), write the resolved config, open the logs and progress, run the assistant's
        warm-up and measure the guards' baseline."""
        c, world = self.config, self.world
        resumed = self.resume()
        if world.is_main:
            where = f"resuming from {self.checkpointer.uri(resumed)} (step {resumed})" if resumed else "starting fresh"
            steps = f"{self.steps} steps" + (f" ({c.kimg:g} kimg)" if c.kimg > 0 else "")
            print(f"distar train: {where}; {steps}, world size {world.size}, config {c.digest()}", flush=True)
            fs, path = storage.filesystem(c.out)
            fs.makedirs(path, exist_ok=True)
            storage.write_json(fs, f"{path.rstrip('/')}/config.json", c.to_dict())
        logger = MetricLogger(c.out, world.is_main, c.log.tensorboard, resume_step=self.step)
        progress = None
        if world.is_main and c.log.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.steps, initial=self.step, desc="distar train", dynamic_ncols=True)
        reporter = ProgressReporter(self.steps, first_step=self.step) if world.is_main else None
        loop = _Loop(logger, progress, reporter, saved_at=self.step if resumed is not None else None)
        loop.first_step, loop.first_skipped = self.step, self.counters["skipped"]["generator"]
        if resumed is None and self.step == 0 and c.assistant_warmup > 0:
            logger.log(0, world.mean(self.assistant_warmup()))
        if c.guard.enabled and world.is_main:
            self.guard.measure_baseline(fresh=resumed is None)
        return loop

    def _log_step(self, loop: _Loop, values: dict, elapsed: float) -> None:
        """Read the step's values in one transfer, average them over ranks, log them, report progress, and beat
        the lease's heartbeat."""
        values = self.world.mean(host_values({k: v for k, v in values.items() if not k.startswith("ok/")}))
        skipped = self.skipped()
        values.update(
            {
                "images_per_s": self.global_batch / elapsed,
                "step_time_s": elapsed,
                "skipped/generator": skipped["generator"],
                "skipped/assistant": skipped["assistant"],
                "lr/generator": self.optimizers["generator"].param_groups[0]["lr"],
                "lr/assistant": self.optimizers["assistant"].param_groups[0]["lr"],
                "peak_memory_gb": _peak_memory_gb(self.world.device),
            }
        )
        self._check_lease()
        loop.logger.log(self.step, values)
        loop.last_values = values
        if loop.reporter is not None:
            loop.reporter.report(self.step, values)
        if self.lease is not None:
            self.lease.heartbeat()

    def _sample_step(self, loop: _Loop) -> None:
        """The fixed sample grid and its reward; the guards, which may stop the run."""
        images, loop.last_eval = self.sample()
        self._check_lease()
        loop.logger.log(self.step, loop.last_eval)
        loop.logger.images(self.step, image_grid(images))
        if self.config.guard.enabled:
            breached = self.guard.check(self.step, loop.logger)
            loop.guard_ok = not breached
            if breached and self.config.guard.stop_on_breach:
                loop.stopped_by = breached

    def _checkpoint_step(self, loop: _Loop) -> None:
        self.save()
        loop.saved_at = self.step
        if self.config.guard.enabled and loop.guard_ok:
            self.checkpointer.mark_best(self.step)
        loop.logger.flush()

    def _preempt(self, loop: _Loop, stop: StopSignals) -> None:
        if loop.saved_at != self.step:
            self.save()
            loop.saved_at = self.step
        loop.logger.flush()
        raise Preempted(
            f"stopped by {stop.received or 'a signal on another rank'} after step {self.step}: checkpoint "
            f"{self.checkpointer.uri(self.step)} is complete; rerun the same command to resume"
        )

    def _summary(self, loop: _Loop) -> dict:
        c = self.config
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "skipped": self.skipped(),
            "checkpoint": self.checkpointer.uri(self.step),
            "config_digest": c.digest(),
            "final": {k: loop.last_values[k] for k in FINAL_METRICS if k in loop.last_values},
            **loop.last_eval,
            **({"best": self.checkpointer.best()} if c.guard.enabled else {}),
            **({"stopped_by_guard": loop.stopped_by} if loop.stopped_by else {}),
        }


@dataclass
class _Loop:
    """What the loop carries from step to step: its outputs, the newest logged values, what was saved."""

    logger: MetricLogger
    progress: object | None
    reporter: ProgressReporter | None
    saved_at: int | None = None
    last_values: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    guard_ok: bool = True
    stopped_by: list = field(default_factory=list)
    first_step: int = 0
    first_skipped: int = 0

    def advance(self) -> None:
        """The progress bar, with the values of the last log step (reading this step's would sync)."""
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(
                reward=f"{self.last_values.get('reward', float('nan')):.4g}",
                div=f"{self.last_values.get('divergence', float('nan')):.4g}",
                balance=f"{self.last_values.get('balance/reward_to_divergence', float('nan')):.3g}",
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.logger.close()


def host_values(values: dict) -> dict[str, float]:
    """The loop's values as floats: the device tensors among them read in one transfer."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in values.items() if k not in keys}
    if keys:
        read = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, read, strict=True))
    return out


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
