"""Building the networks of a DI* run: load what the config names, set dtypes and devices, then `parallelize`.

The trainable UNets keep fp32 master weights (bf16 compute comes from autocast or FSDP's mixed precision); the
frozen reference, text encoders, VAE and rewards live in their configured dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from distar import backbones, sources
from distar.backbones import Assistant, OneStepGenerator, PromptEncoder, Reference
from distar.backbones.shared import add_assistant_adapter, add_generator_adapter, is_adapter_param
from distar.errors import UserError
from distar.rewards import WeightedReward
from distar.sources import parse_dtype
from distar.train import parallel, precision
from distar.train.config import TrainConfig
from distar.train.distributed import World


@dataclass
class Networks:
    generator: OneStepGenerator
    """The generator, and through it the backbone (`generator.backbone`) every network shares."""
    assistant: Assistant
    reference: Reference
    prompt_encoder: PromptEncoder | None
    vae: nn.Module
    reward: WeightedReward | None
    generator_train: nn.Module | None = None
    """What the generator update calls: the generator, or its data-parallel wrapper (set by `parallelize`)."""
    assistant_train: nn.Module | None = None
    """What the assistant update calls: the assistant, or its data-parallel wrapper."""
    generator_unet: nn.Module = field(init=False)
    assistant_unet: nn.Module = field(init=False)
    """The assistant's UNet: its own, or the reference's with LoRA adapters (model.assistant = "lora")."""
    assistant_params: list[nn.Parameter] = field(init=False)
    """What the assistant trains: every weight of its UNet, or the adapters."""

    def __post_init__(self):
        self.generator_unet = self.generator.unet
        self.assistant_unet = self.assistant.unet
        self.assistant_params = self.assistant.trainable()
        self.generator_train = self.generator_train or self.generator
        self.assistant_train = self.assistant_train or self.assistant

    @property
    def lora_assistant(self) -> bool:
        return self.assistant_unet is self.reference.unet

    @property
    def lora_generator(self) -> bool:
        """The generator trains LoRA adapters on a frozen base (model.generator = "lora")."""
        return any(is_adapter_param(name) for name, _ in self.generator_unet.named_parameters())

    def freeze_assistant(self, frozen: bool) -> None:
        """The generator update backpropagates through the assistant's input, never into its weights."""
        for param in self.assistant_params:
            param.requires_grad_(not frozen)


class OffloadedPromptEncoder:
    """Text encoders whose weights live in host memory (pinned, for a fast copy) and come to `device` only while a
    batch is encoded (model.text_encoder_offload). Going back costs nothing: the weights are frozen, so their GPU
    copies are dropped, not copied back."""

    def __init__(self, encoder: nn.Module, device):
        import torch

        self.encoder, self.device = encoder, torch.device(device)
        self.host = [t for t in (*encoder.parameters(), *encoder.buffers())]
        if self.device.type == "cuda":
            for t in self.host:
                t.data = t.data.pin_memory()
        self.host_data = [t.data for t in self.host]

    def encode(self, prompts, height: int, width: int):
        for t, data in zip(self.host, self.host_data, strict=True):
            t.data = data.to(self.device, non_blocking=True, copy=True)  # a copy even where device is the host
        try:
            return self.encoder.encode(prompts, height, width)
        finally:
            for t, data in zip(self.host, self.host_data, strict=True):
                t.data = data


def check_resolution(resolution: int, vae_factor: int, latent_multiple: int = 8) -> None:
    """Latents of resolution / vae_factor pixels must divide as the denoiser needs (`Backbone.latent_multiple`:
    SDXL's UNet halves them three times, a transformer's patches take 2)."""
    if resolution % (vae_factor * latent_multiple):
        raise UserError(f"data.resolution={resolution} must be a multiple of {vae_factor * latent_multiple}")


def build_networks(config: TrainConfig, world: World, need_text_encoders: bool) -> Networks:
    """Load every network the config names, then `assemble` them."""
    m = config.model
    backbone = backbones.get(m.backbone)
    hub = sources.hub_options(m.cache_dir, m.offline)
    ref_options = {**hub, "revision": m.revision}
    vae_options = hub if m.vae else ref_options
    # the VAE's config alone, before any weights: a resolution the latents cannot take fails in seconds
    vae_factor = backbone.vae_factor(backbone.vae_config(m.vae or m.reference, **vae_options))
    check_resolution(config.data.resolution, vae_factor, backbone.latent_multiple)
    reference_unet = backbone.load_denoiser(m.reference, dtype="fp32", **ref_options)

    generator_unet = backbone.load_generator_init(
        m.generator_init, m.reference, reference_net=reference_unet, revision=m.revision, **hub
    )
    assistant_unet = None  # LoRA: adapters on the reference's network, added in `assemble`
    if m.assistant == "full":
        assistant_init = None if m.assistant_init == "reference" else m.assistant_init
        assistant_unet = Assistant.from_reference(reference_unet, init=assistant_init, backbone=backbone, **hub).unet
    prompt_encoder = None
    if need_text_encoders:
        prompt_encoder = backbone.prompt_encoder(m.reference, dtype=m.text_encoder_dtype, **ref_options)
    vae = backbone.load_vae(m.vae or m.reference, dtype=m.vae_dtype, **vae_options)
    reward = None
    if config.reward.weights:
        r = config.reward
        reward = WeightedReward.from_specs([r.spec(name, w) for name, w in r.weights.items()], dtype=r.dtype, **hub)
    return assemble(config, world, reference_unet, generator_unet, assistant_unet, vae, reward, prompt_encoder)


def assemble(
    config: TrainConfig,
    world: World,
    reference_unet: nn.Module,
    generator_unet: nn.Module,
    assistant_unet: nn.Module | None,
    vae: nn.Module,
    reward: WeightedReward | None,
    prompt_encoder: PromptEncoder | None = None,
) -> Networks:
    """The networks as the loop uses them: weight dtypes and device here, then `parallel.parallelize`.
    `assistant_unet` None: the assistant is LoRA adapters on the reference's UNet (model.assistant = "lora")."""
    m = config.model
    backbone = backbones.get(m.backbone)
    targets = backbone.lora_targets
    if m.generator == "lora":  # a frozen base in the reference's dtype, trainable fp32 adapters
        generator_unet = generator_unet.to(world.device, parse_dtype(m.reference_dtype))
        add_generator_adapter(generator_unet, targets, m.generator_lora_rank, m.generator_lora_alpha, config.seed)
    else:
        generator_unet = generator_unet.float()
    generator = OneStepGenerator(generator_unet.to(world.device), t_star=m.t_star, backbone=backbone)
    reference = Reference(
        reference_unet.to(world.device, parse_dtype(m.reference_dtype)), config.loss.guidance_scale(), backbone=backbone
    )
    if assistant_unet is None or m.assistant == "lora":
        rank, alpha = m.assistant_lora_rank, m.assistant_lora_alpha
        assistant = Assistant(
            add_assistant_adapter(reference.unet, targets, rank, alpha, config.seed), backbone=backbone
        )
    else:
        assistant = Assistant(assistant_unet.float(), backbone=backbone).to(world.device)
    if prompt_encoder is not None and m.text_encoder_offload:
        prompt_encoder = OffloadedPromptEncoder(
            prompt_encoder.to("cpu", parse_dtype(m.text_encoder_dtype)), world.device
        )
    elif prompt_encoder is not None:
        prompt_encoder.to(world.device, parse_dtype(m.text_encoder_dtype))
    vae = vae.to(world.device, parse_dtype(m.vae_dtype)).requires_grad_(False).eval()
    if m.vae_fp32_norms:
        precision.fp32_norms(vae)
    if config.parallel.channels_last:
        precision.to_channels_last(*{id(u): u for u in (generator.unet, assistant.unet, reference.unet)}.values(), vae)
    if reward is not None:
        reward = reward.to(world.device, parse_dtype(config.reward.dtype)).requires_grad_(False).eval()
    nets = Networks(generator, assistant, reference, prompt_encoder, vae, reward)
    return parallel.parallelize(nets, config.parallel, world)
