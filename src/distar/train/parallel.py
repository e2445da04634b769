"""Parallelism applied from outside the models: activation checkpointing, then FSDP2 or DDP.

`parallelize` is the one entry (torchtitan's per-model rule): it takes the assembled networks and the parallel
config and returns them ready for the loop. FSDP2 (`fully_shard`) shards each block of a network (the backbone's
`blocks`) and then the root, so only one block's full parameters live at a time; activation checkpointing wraps
the same blocks first (the torchtitan / FastGen order). The frozen reference is sharded in its own (bf16) weights
without gradients. The loop asks this module, and nothing else, about wrappers: `gradient_sync`, `param_name`,
`clip_grad_norm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from distar.backbones import shared
from distar.backbones.base import Backbone


def block_modules(backbone: Backbone, net: nn.Module) -> list[nn.Module]:
    """The blocks of `backbone.blocks(net)`, themselves."""
    return [_get(parent, key) for parent, key in backbone.blocks(net)]


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, module):
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def apply_activation_checkpointing(backbone: Backbone, net: nn.Module) -> nn.Module:
    state = shared.base(net)
    for parent, key in backbone.blocks(net):
        block = _get(parent, key)
        _set(parent, key, AdapterStateCheckpoint(block, state) if state.has_adapters else checkpoint_wrapper(block))
    return net


class AdapterStateCheckpoint(ActivationWrapper):
    """Activation checkpointing of one block of a network whose LoRA adapters are switched per forward (the shared
    reference / assistant network): the recompute in the backward pass runs with the adapters as they were in the
    forward, whichever of the two ran last. torch's wrapper base puts the block where checkpoint_wrapper does and
    strips its prefix from parameter and state-dict names, so checkpoints read as the plain network's."""

    def __init__(self, block: nn.Module, state: shared.SharedBase):
        super().__init__(block)
        self.state = state  # the owning network's adapter state (not a submodule)
        self.layers = shared.tuner_layers(block)

    def forward(self, *args, **kwargs):
        on = self.state.adapters_on
        return torch.utils.checkpoint.checkpoint(self._run, on, *args, use_reentrant=False, **kwargs)

    def _run(self, on: bool, *args, **kwargs):
        shared.switch_adapters(self.layers, on)
        return self._checkpoint_wrapped_module(*args, **kwargs)


def apply_vae_checkpointing(backbone: Backbone, vae: nn.Module) -> nn.Module:
    """Recompute each block of the VAE decoder in the backward pass: at 1024×1024 the decoder's activations
    for the reward gradient are the largest single item of the budget (docs/TRAINING.md)."""
    for resnets in backbone.vae_blocks(vae):
        for i in range(len(resnets)):
            resnets[i] = checkpoint_wrapper(resnets[i])
    return vae


def mesh(world_size: int, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,))


def shard(
    backbone: Backbone, net: nn.Module, device_mesh: DeviceMesh, mixed_precision: str, trainable: bool
) -> nn.Module:
    """fully_shard per block, then the root. Trainable UNets keep fp32 master weights and compute in bf16 when
    mixed_precision is bf16 (gradients reduced in fp32); a frozen UNet computes in its own dtype. A LoRA network
    (a frozen base in the reference's dtype, fp32 adapters) shards as one: FSDP2 asks one dtype of the weights that
    train, not of the frozen ones, and all-gathers mixed dtypes as bytes."""
    policy = MixedPrecisionPolicy()
    if trainable and mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for parent, key in backbone.blocks(net):
        fully_shard(_get(parent, key), mesh=device_mesh, mp_policy=policy)
    fully_shard(net, mesh=device_mesh, mp_policy=policy)
    return net


def parallelize(nets, config, world):
    """Activation checkpointing, then FSDP2 (`strategy="fsdp"`) or DDP (`"ddp"`) of the assembled networks.

    nets: a `distar.train.networks.Networks` on `world.device`; config: its `ParallelConfig`. Returns the same
    networks, where `generator_train` / `assistant_train` are what the updates call (a DDP wrapper under "ddp",
    the network itself otherwise); `generator` / `assistant` stay the plain networks for frozen uses.
    """
    from distar.errors import UserError

    if config.strategy == "none" and world.size > 1:
        raise UserError(f"parallel.strategy='none' runs one process, but WORLD_SIZE is {world.size}; use ddp or fsdp")
    backbone = nets.generator.backbone
    if config.activation_checkpointing:
        unets = (nets.generator.unet, nets.assistant.unet, nets.reference.unet)
        for unet in {id(u): u for u in unets}.values():  # a LoRA assistant shares the reference's network
            apply_activation_checkpointing(backbone, unet)
    if getattr(config, "compile", False):
        compile_regions(nets, config.compile_cache)
    generator_train, assistant_train = nets.generator, nets.assistant
    if config.strategy == "fsdp":
        device_mesh = mesh(world.size, world.device)
        shard(backbone, nets.generator.unet, device_mesh, config.mixed_precision, trainable=True)
        # a LoRA assistant is adapters on the reference's network: that one network is sharded once, as trainable
        # (its frozen base keeps its own dtype, the fp32 adapters compute in bf16 and reduce in fp32)
        shard(backbone, nets.assistant.unet, device_mesh, config.mixed_precision, trainable=True)
        if nets.reference.unet is not nets.assistant.unet:
            shard(backbone, nets.reference.unet, device_mesh, config.mixed_precision, trainable=False)
    elif config.strategy == "ddp":
        generator_train, assistant_train = (
            replicate(nets.generator, world.device),
            replicate(nets.assistant, world.device),
        )
    if config.vae_checkpointing:
        apply_vae_checkpointing(backbone, nets.vae)
    return dataclasses.replace(nets, generator_train=generator_train, assistant_train=assistant_train)


def compile_regions(nets, cache_dir: str | None = None) -> None:
    """torch.compile each block (of each of the three networks; a LoRA assistant's network once) and the VAE decoder,
    in place (`nn.Module.compile`: parameter names, and so checkpoints, stay the same). Blocks of one UNet share
    code, so compiling per block costs a few graphs, not one per call site."""
    import os

    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    import torch._functorch.config

    # The log steps' balance measurement (di_star.reward_divergence_balance) takes two gradients of one graph
    # (retain_graph), which compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    unets = (nets.generator.unet, nets.assistant.unet, nets.reference.unet)
    for unet in {id(u): u for u in unets}.values():
        for block in block_modules(nets.generator.backbone, unet):
            block.compile()
    nets.vae.decoder.compile()


def gradient_sync(module: nn.Module, enabled: bool):
    """A context in which `module`'s backward passes reduce gradients across ranks only when `enabled` (the last
    micro-batch of an update): DDP's no_sync, FSDP2's requires_gradient_sync."""
    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else module.no_sync()
    for sub in module.modules():
        if hasattr(sub, "set_requires_gradient_sync"):
            sub.set_requires_gradient_sync(enabled)
            break
    return contextlib.nullcontext()


def param_name(name: str) -> str:
    """A parameter's name without the activation-checkpointing wrapper's prefix (the plain model's name)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) and return the global gradient norm over every rank's shards, as a
    0-dim tensor on the device (reading it is the caller's host sync)."""
    if not parameters:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def replicate(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the process group (gradients all-reduced in the backward pass)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (calling it skips DDP's gradient hooks: for frozen uses)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
