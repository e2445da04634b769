"""One denoising network and the state its passes share: which LoRA adapters are on, and which dtype its compute
weights have. The reference and a LoRA assistant are one network (adapters off: the reference; on: the
assistant); the bf16 weight copies of `distar.train.precision` swap a network's compute weights for some passes.
Both are kept here, in one object per network (`base(net)`), instead of in attributes set on the modules.

LoRA itself is peft's (through diffusers' `add_adapter`): adapters are switched with peft's public
`enable_adapters`, and the requires_grad flags that peft changes on the way are put back, since the training loop
owns them (the assistant's adapters are frozen while the generator update backpropagates through them).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import nn

ASSISTANT_ADAPTER = "assistant"
GENERATOR_ADAPTER = "generator"

# The layers whose weights bf16 autocast casts on every call (F.linear, F.conv2d); the norms run in fp32 under
# autocast from their own fp32 weights, so their weights are left as they are.
CAST_LAYERS = (nn.Linear, nn.Conv2d)


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def adapter_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in net.named_parameters() if is_adapter_param(n)]


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """peft's adapted layers inside `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def switch_adapters(layers: Iterable[nn.Module], on: bool) -> None:
    """Adapters of `layers` on or off through peft's public API, leaving every requires_grad flag as it was (peft
    sets those of the adapter weights, its `adapter_layer_names`, and no others)."""
    for layer in layers:
        flags = [(p, p.requires_grad) for name in layer.adapter_layer_names for p in getattr(layer, name).parameters()]
        layer.enable_adapters(on)
        for p, flag in flags:
            p.requires_grad_(flag)


class SharedBase:
    """A denoising network and the state that every pass through it reads: its adapters (on or off) and its
    compute dtype (the dtype of bf16 copies swapped in, where they differ from the weights' own)."""

    def __init__(self, net: nn.Module):
        self.net = net
        self.layers: list[nn.Module] = []
        """peft's adapted layers (empty: a plain network)."""
        self.adapters_on = False
        self.input_dtype: torch.dtype | None = None
        """The dtype its inputs are cast to, while compute weights of another dtype are in (`compute_weights`)."""

    @property
    def has_adapters(self) -> bool:
        return bool(self.layers)

    def attach_adapters(self, on: bool) -> None:
        """Take note of adapters just added to the network, and switch them on or off."""
        self.layers = tuner_layers(self.net)
        self.set_adapters(on)

    def set_adapters(self, on: bool) -> None:
        switch_adapters(self.layers, on)
        self.adapters_on = on

    @contextlib.contextmanager
    def adapters(self, on: bool):
        """A pass of the shared network as the assistant (`on`) or as the reference; nothing for a plain one."""
        if not self.has_adapters:
            yield
            return
        before = self.adapters_on
        self.set_adapters(on)
        try:
            yield
        finally:
            self.set_adapters(before)

    def compute_dtype(self) -> torch.dtype:
        """What the network's inputs are cast to: its compute weights' dtype."""
        return self.input_dtype or next(self.net.parameters()).dtype

    @contextlib.contextmanager
    def compute_weights(self, bf16: bool = True):
        """While the block runs, the network's fp32 Linear and Conv2d weights are bf16 copies made here, once; on
        exit the fp32 weights are back, untouched. Only for passes in which those weights take no gradient and do
        not change (a frozen network, or one under no_grad): the copies are what autocast would make, so outputs
        and the gradients to the inputs are those of autocast. The inputs keep the dtype they had."""
        params = cast_weights(self.net) if bf16 else []
        if not params:
            yield
            return
        masters = [p.data for p in params]
        copies = [torch.empty_like(m, dtype=torch.bfloat16) for m in masters]
        with torch.no_grad():
            torch._foreach_copy_(copies, masters)  # a few multi-tensor kernels instead of one cast per layer
        had = self.input_dtype
        self.input_dtype = had or next(self.net.parameters()).dtype
        try:
            for p, c in zip(params, copies, strict=True):
                p.data = c
            yield
        finally:
            for p, m in zip(params, masters, strict=True):
                p.data = m
            self.input_dtype = had


_BASES: weakref.WeakKeyDictionary[nn.Module, SharedBase] = weakref.WeakKeyDictionary()


def base(net: nn.Module) -> SharedBase:
    """The one SharedBase of `net` (made at the first call): every wrapper of one network shares its state."""
    found = _BASES.get(net)
    if found is None:
        found = _BASES[net] = SharedBase(net)
    return found


def cast_weights(module: nn.Module) -> list[nn.Parameter]:
    """The fp32 weights and biases of `module`'s Linear and Conv2d layers (each once)."""
    seen, out = set(), []
    for layer in module.modules():
        if isinstance(layer, CAST_LAYERS):
            for p in layer.parameters(recurse=False):
                if p.dtype == torch.float32 and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


# -- LoRA ---------------------------------------------------------------------------------------------


def add_lora(net: nn.Module, name: str, targets: Sequence[str], rank: int, alpha: float, seed: int = 0) -> nn.Module:
    """LoRA adapters (peft, through diffusers' integration) named `name` on `net`'s `targets`, zero-initialised
    (B = 0: the network computes what it computed before), in fp32 and trainable; the base weights stay as they
    are, frozen. A's random init comes from `seed`, not from the process's random state: a run and its restart
    start from the same adapters."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(targets))
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        net.add_adapter(config, adapter_name=name)
    for param_name, param in net.named_parameters():
        adapter = is_adapter_param(param_name)
        if adapter:
            param.data = param.data.float()
        param.requires_grad_(adapter)
    return net


def add_generator_adapter(net: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int = 0):
    """The generator as LoRA adapters on its initial network (model.generator = "lora"), always on; only they
    train."""
    return add_lora(net, GENERATOR_ADAPTER, targets, rank, alpha, seed)


def merge_generator_adapter(net: nn.Module) -> nn.Module:
    """A plain network with the generator's adapters merged into its weights (W + (alpha / rank) B A): what a
    diffusers pipeline loads without peft."""
    net.fuse_lora()
    net.unload_lora()
    return net


def add_assistant_adapter(net: nn.Module, targets: Sequence[str], rank: int, alpha: float, seed: int = 0):
    """The assistant as LoRA adapters on the reference's network (`add_lora`): zero-initialised (with them on,
    the network still computes the reference's output at step 0) and off until a pass asks for them
    (`SharedBase.adapters`)."""
    add_lora(net, ASSISTANT_ADAPTER, targets, rank, alpha, seed)
    base(net).attach_adapters(False)
    return net
