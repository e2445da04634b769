"""`distar calibrate`: how hard the reward pulls against the divergence, for several α_rew, before a long run.

For each α_rew the same networks start from the same weights, fresh optimizers, and the same prompts and noise, and
run a few DI* iterations; each generator update measures the per-sample RMS of ∂(α_rew·r)/∂x0 and of ∂L_div/∂x0
(`train.di_star.reward_divergence_balance`). The table shows, per α_rew, the mean reward and divergence over the
steps, both gradient norms, their ratio, and how far the reward moved from the first step to the last. On the
paper's scale (docs/METHOD.md §6) α_rew = 1 and 10 should barely move the reward and α_rew = 100 should: a ratio
far above 1 at the intended α_rew warns of reward hacking before GPU-days are spent.

Memory: one copy of the generator's and the assistant's weights is kept on the host to restart each α_rew.
"""

from __future__ import annotations

import copy
import math

from distar.errors import UserError
from distar.train.config import TrainConfig
from distar.train.distributed import World


def calibrate(config: TrainConfig, world: World, alphas: list[float], steps: int) -> list[dict]:
    """One row per α_rew (see the module docstring)."""
    from distar.train.trainer import Trainer, host_values

    if not alphas or any(not math.isfinite(a) or a <= 0 for a in alphas):
        raise UserError(f"--alphas {alphas}: name one or more finite α_rew values > 0, e.g. --alphas 1,10,100")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if not config.reward.weights:
        raise UserError("calibrate compares the reward with the divergence: the config names no reward")
    config = copy.deepcopy(config)
    config.log.every = 1  # the balance is measured on log steps
    trainer = Trainer(config, world)
    start = {
        "generator": {k: v.detach().cpu().clone() for k, v in trainer.nets.generator_unet.state_dict().items()},
        "assistant": {k: v.detach().cpu().clone() for k, v in trainer.nets.assistant_unet.state_dict().items()},
    }
    rows = []
    for alpha in alphas:
        trainer.nets.generator_unet.load_state_dict(start["generator"])
        trainer.nets.assistant_unet.load_state_dict(start["assistant"])
        trainer.optimizers = {
            "generator": trainer._optimizer(trainer.nets.generator_unet, config.generator_optim),
            "assistant": trainer._optimizer(trainer.nets.assistant_unet, config.assistant_optim),
        }
        trainer.settle()
        trainer.counters.update(step=0, samples_seen=0, skipped={"generator": 0, "assistant": 0})
        config.loss.alpha_rew = alpha
        history = [world.mean(host_values({k: v for k, v in trainer.train_step().items() if not k.startswith("ok/")}))
                   for _ in range(steps)]  # fmt: skip

        mean = {key: sum(h[key] for h in history) / len(history) for key in history[0]}
        rows.append({
            "alpha_rew": alpha, "reward": mean["reward"], "divergence": mean["divergence"],
            "reward_grad_rms": mean["balance/reward_grad_rms"],
            "divergence_grad_rms": mean["balance/divergence_grad_rms"],
            "reward_to_divergence": mean["balance/reward_to_divergence"],
            "reward_change": history[-1]["reward"] - history[0]["reward"],
        })  # fmt: skip
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| α_rew | reward | divergence | ‖∂(α·r)/∂x0‖ rms | ‖∂L_div/∂x0‖ rms | ratio | reward change |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['alpha_rew']:g} | {r['reward']:.4g} | {r['divergence']:.4g} | {r['reward_grad_rms']:.3g} | "
            f"{r['divergence_grad_rms']:.3g} | {r['reward_to_divergence']:.3g} | {r['reward_change']:+.3g} |"
        )
    return "\n".join(lines)
