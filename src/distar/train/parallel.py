"""Parallelism applied from outside the models: activation checkpointing, then FSDP2 or DDP.

FSDP2 (`fully_shard`) shards each UNet block (down blocks, mid block, up blocks) and then the root, so only
one block's full parameters live at a time; activation checkpointing wraps the same blocks first (the
torchtitan / FastGen order). The frozen reference is sharded in its own (bf16) weights without gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def unet_blocks(unet: nn.Module) -> list[tuple[nn.ModuleList | nn.Module, str | int]]:
    """(parent, key) of every block of a diffusers UNet2DConditionModel, in forward order."""
    blocks = [(unet.down_blocks, i) for i in range(len(unet.down_blocks))]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append((unet, "mid_block"))
    blocks += [(unet.up_blocks, i) for i in range(len(unet.up_blocks))]
    return blocks


def unet_block_modules(unet: nn.Module) -> list[nn.Module]:
    """The blocks of `unet_blocks`, themselves."""
    return [_get(parent, key) for parent, key in unet_blocks(unet)]


def vae_decoder_resnets(vae: nn.Module) -> list[nn.ModuleList]:
    """The ResNet lists of the VAE decoder's mid and up blocks: what VAE checkpointing wraps."""
    return [vae.decoder.mid_block.resnets] + [up.resnets for up in vae.decoder.up_blocks]


def _get(parent, key):
    return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, module):
    if isinstance(key, int):
        parent[key] = module
    else:
        setattr(parent, key, module)


def apply_activation_checkpointing(unet: nn.Module) -> nn.Module:
    for parent, key in unet_blocks(unet):
        _set(parent, key, checkpoint_wrapper(_get(parent, key)))
    return unet


def apply_vae_checkpointing(vae: nn.Module) -> nn.Module:
    """Recompute each ResNet block of the VAE decoder in the backward pass: at 1024×1024 the decoder's activations
    for the reward gradient are the largest single item of the budget (docs/TRAINING.md)."""
    for resnets in vae_decoder_resnets(vae):
        for i in range(len(resnets)):
            resnets[i] = checkpoint_wrapper(resnets[i])
    return vae


def mesh(world_size: int, device: torch.device) -> DeviceMesh:
    return init_device_mesh(device.type, (world_size,))


def shard_unet(unet: nn.Module, device_mesh: DeviceMesh, mixed_precision: str, trainable: bool) -> nn.Module:
    """fully_shard per block, then the root. Trainable UNets keep fp32 master weights and compute in bf16 when
    mixed_precision is bf16 (gradients reduced in fp32); a frozen UNet computes in its own dtype."""
    policy = MixedPrecisionPolicy()
    if trainable and mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for parent, key in unet_blocks(unet):
        fully_shard(_get(parent, key), mesh=device_mesh, mp_policy=policy)
    fully_shard(unet, mesh=device_mesh, mp_policy=policy)
    return unet


def replicate(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the process group (gradients all-reduced in the backward pass)."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (calling it skips DDP's gradient hooks: for frozen uses)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
