"""The flow backbones at the network level, each against a hand computation with stock diffusers' transformers,
FluxPipeline's own packing helpers and FlowMatchEulerDiscreteScheduler: the one-step generator, SD3's true-CFG
reference (negative branch: the empty prompt's encoding), FLUX's embedded-guidance reference, the assistant."""

import copy

import pytest
import torch

from distar.backbones.base import Assistant, OneStepGenerator, Reference
from distar.backbones.flux import Flux, FluxConditioning
from distar.backbones.flux import tiny_transformer_config as tiny_flux
from distar.backbones.sd3 import SD3, SD3Conditioning
from distar.backbones.sd3 import tiny_transformer_config as tiny_sd3

B, H, W = 2, 8, 8


@pytest.fixture(scope="module")
def sd3_net():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**tiny_sd3()).eval()


def _flux_net(guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(1)
    return FluxTransformer2DModel(**tiny_flux(guidance_embeds)).eval()


def _sd3_cond(g):
    embeds, null = torch.randn(B, 5, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    pooled, null_pooled = torch.randn(B, 64, generator=g), torch.randn(1, 64, generator=g)
    return SD3Conditioning(embeds, pooled, null, null_pooled)


def _flux_cond(g):
    return FluxConditioning(torch.randn(B, 6, 32, generator=g), torch.randn(B, 32, generator=g))


def _sd3_velocity(net, x, sigma, embeds, pooled):
    """As StableDiffusion3Pipeline calls it: timestep = σ·1000 (its scheduler's timesteps)."""
    with torch.no_grad():
        return net(
            hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds, pooled_projections=pooled
        ).sample


def _flux_velocity(net, x, sigma, cond, guidance):
    """As FluxPipeline calls it, with its own packing and positional ids: timestep = σ, guidance g (or None)."""
    from diffusers import FluxPipeline

    packed = FluxPipeline._pack_latents(x, B, 16, H, W)
    ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    g = None if guidance is None else torch.full([1], guidance).expand(B)
    with torch.no_grad():
        out = net(hidden_states=packed, timestep=sigma, guidance=g, pooled_projections=cond.pooled_prompt_embeds,
                  encoder_hidden_states=cond.prompt_embeds, txt_ids=torch.zeros(6, 3), img_ids=ids).sample  # fmt: skip
    # _unpack_latents takes pixel sizes: vae_scale_factor 1 makes them the latent sizes
    return FluxPipeline._unpack_latents(out, H, W, 1)


def _one_scheduler_step(z, v, shift):
    """x0 after stock diffusers' one Euler step from σ = 1 (the exported pipeline's one step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(1)
    assert float(scheduler.sigmas[0]) == 1.0
    return scheduler.step(v, scheduler.timesteps[0], z).prev_sample


def test_sd3_one_step_generator_is_z_minus_the_velocity_at_sigma_one(sd3_net):
    g = torch.Generator().manual_seed(2)
    z, cond = torch.randn(B, 16, H, W, generator=g), _sd3_cond(g)
    with torch.no_grad():
        x0 = OneStepGenerator(sd3_net, backbone=SD3())(z, cond)
    v = _sd3_velocity(sd3_net, z, torch.ones(B), cond.prompt_embeds, cond.pooled_prompt_embeds)
    torch.testing.assert_close(x0, z - v)
    torch.testing.assert_close(x0, _one_scheduler_step(z, v, 3.0), rtol=1e-5, atol=1e-5)


def test_sd3_reference_takes_true_cfg_against_the_empty_prompt(sd3_net):
    g = torch.Generator().manual_seed(3)
    x_t, cond = torch.randn(B, 16, H, W, generator=g), _sd3_cond(g)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        eps = Reference(copy.deepcopy(sd3_net), 4.5, backbone=SD3())(x_t, sigma, cond)
    v_c = _sd3_velocity(sd3_net, x_t, sigma, cond.prompt_embeds, cond.pooled_prompt_embeds)
    null, null_pooled = cond.null_prompt_embeds.expand(B, -1, -1), cond.null_pooled_prompt_embeds.expand(B, -1)
    v_u = _sd3_velocity(sd3_net, x_t, sigma, null, null_pooled)
    v = v_u + 4.5 * (v_c - v_u)  # the pipeline's CFG, on velocities
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps, x_t + (1 - s) * v, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the assistant: conditional, no guidance
        eps_psi = Assistant(copy.deepcopy(sd3_net), backbone=SD3())(x_t, sigma, cond)
    torch.testing.assert_close(eps_psi, x_t + (1 - s) * v_c, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no embedded guidance"):
        SD3().forward(sd3_net, x_t, sigma, cond, guidance=3.5)


def test_flux_reference_embeds_its_guidance_and_has_no_unconditional_branch():
    net = _flux_net(True)
    g = torch.Generator().manual_seed(4)
    x_t, cond = torch.randn(B, 16, H, W, generator=g), _flux_cond(g)
    sigma = torch.tensor([0.25, 0.9])
    reference = Reference(copy.deepcopy(net), 3.5, backbone=Flux())
    with torch.no_grad():
        eps = reference(x_t, sigma, cond)
        eps_psi = Assistant(copy.deepcopy(net), backbone=Flux())(x_t, sigma, cond)
    s = sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps, x_t + (1 - s) * _flux_velocity(net, x_t, sigma, cond, 3.5), rtol=1e-5, atol=1e-5)
    # the assistant runs the same network at g = 1: the conditional velocity, no guidance
    torch.testing.assert_close(
        eps_psi, x_t + (1 - s) * _flux_velocity(net, x_t, sigma, cond, 1.0), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(eps, eps_psi)
    with pytest.raises(ValueError, match="DI\\*-OUT"):
        reference.branches(x_t, sigma, cond)


def test_flux_one_step_generator_from_a_network_without_guidance_embedding():
    net = _flux_net(False)  # FLUX.1-schnell's kind: a generator start, never a reference
    g = torch.Generator().manual_seed(5)
    z, cond = torch.randn(B, 16, H, W, generator=g), _flux_cond(g)
    with torch.no_grad():
        x0 = OneStepGenerator(net, backbone=Flux())(z, cond)
    v = _flux_velocity(net, z, torch.ones(B), cond, None)
    torch.testing.assert_close(x0, z - v)
    torch.testing.assert_close(x0, _one_scheduler_step(z, v, 1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no guidance embedding"):
        Flux().forward(net, z, torch.ones(B), cond, guidance=3.5)
    with pytest.raises(ValueError, match="0 < t_star ≤ 1000"):
        OneStepGenerator(net, 0, backbone=Flux())
    half = OneStepGenerator(net, 500, backbone=Flux())  # σ* = 0.5, a few-step start
    with torch.no_grad():
        torch.testing.assert_close(half(z, cond), z - 0.5 * _flux_velocity(net, z, torch.full((B,), 0.5), cond, None))


@pytest.mark.parametrize("backbone, build", [(SD3(), "sd3"), (Flux(), "flux")])
def test_blocks_and_lora_targets_name_real_modules(backbone, build, sd3_net):
    import re

    net = sd3_net if build == "sd3" else _flux_net(True)
    blocks = backbone.blocks(net)
    expected = len(net.transformer_blocks) + len(getattr(net, "single_transformer_blocks", []))
    assert len(blocks) == expected and all(isinstance(parent[key], torch.nn.Module) for parent, key in blocks)
    names = [n for n, _ in net.named_modules()]
    assert sum(bool(re.fullmatch(backbone.block_pattern, n)) for n in names) == expected
    for target in backbone.lora_targets:  # both streams' projections, as peft matches them (by name suffix)
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_the_real_architectures_have_their_published_sizes():
    """Built on the meta device from the configs distar keeps: SD3.5-Medium 2.243 B, SD3.5-Large 8.057 B, FLUX.1
    11.901 B transformer parameters (the sizes `distar plan` will count)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from distar.backbones.flux import FLUX1_CONFIG
    from distar.backbones.sd3 import SD35_LARGE_CONFIG, SD35_MEDIUM_CONFIG

    with torch.device("meta"):
        sizes = [
            sum(p.numel() for p in cls(**config).parameters())
            for cls, config in (
                (SD3Transformer2DModel, SD35_MEDIUM_CONFIG),
                (SD3Transformer2DModel, SD35_LARGE_CONFIG),
                (FluxTransformer2DModel, FLUX1_CONFIG),
            )
        ]
    assert sizes == [2_243_171_520, 8_056_627_520, 11_901_408_320]


def test_training_draws_sigma_uniformly_unless_asked_for_the_models_shift_and_density():
    """loss.sigma_density and loss.sigma_shift: uniform and unshifted by default (the issue's U(0.02, 0.98)); on
    request SD3.5's static shift 3 or FLUX's shift for the latent size, and SD3's logit-normal density."""
    import math

    from distar.errors import UserError
    from distar.train.config import load_config

    default = load_config("tiny-sd3").loss
    schedule = SD3().training_schedule(default, 128, 128)
    assert (schedule.shift, schedule.density) == (1.0, "uniform")
    shifted = load_config("tiny-sd3", ["loss.sigma_shift=true", "loss.sigma_density=logit_normal"]).loss
    schedule = SD3().training_schedule(shifted, 128, 128)
    assert (schedule.shift, schedule.density) == (3.0, "logit_normal")
    flux = Flux().training_schedule(shifted, 128, 128)  # 1024² latents: 4096 tokens, μ = 1.15
    assert flux.shift == pytest.approx(math.exp(1.15)) and flux.time_scale == 1.0
    with pytest.raises(UserError, match="sdxl draws its timesteps uniformly"):
        load_config("tiny", ["loss.sigma_shift=true"])


def test_a_flow_config_refuses_an_assistant_range_reaching_pure_noise(capsys):
    """The flow-matching weight 1/(1 − σ)² needs σ < 1: loss.assistant_t_max above 990 is refused by name, with the
    presets' value to use; SDXL keeps its 1000 (its table's end); `distar train` exits 2 without a traceback."""
    from distar.errors import UserError
    from distar.train import main
    from distar.train.config import load_config

    with pytest.raises(UserError, match=r"loss.assistant_t_max=1000: .* keep it at most 990"):
        load_config("tiny-sd3", ["loss.assistant_t_max=1000"])
    assert load_config("tiny-sd3", ["loss.assistant_t_max=990"]).loss.assistant_t_max == 990
    assert load_config("tiny", ["loss.assistant_t_max=1000"]).loss.assistant_t_max == 1000
    assert main(["--config", "tiny-flux", "loss.assistant_t_max=995"]) == 2
    err = capsys.readouterr().err
    assert "loss.assistant_t_max=995" in err and "Traceback" not in err


def test_the_lab_refuses_a_family_it_has_no_reference_for():
    from distar.errors import UserError
    from distar.lab import LabConfig

    with pytest.raises(UserError, match="--family 'flux': choose one of sdxl, sd3"):
        LabConfig.make("unused", family="flux")
    assert LabConfig.make("unused", quick=True, family="sd3").family == "sd3"
