"""The tiny FLUX.1 family through the real loaders: stock FluxPipeline reads the directory `build_tiny_flux`
writes (dev's kind, with the guidance embedding, and schnell's, without), distar's prompt encoder gives its
conditioning, the stock pipeline's one step from σ = 1 lands on the trainer's generator, and FLUX's
resolution-dependent shift is the static shift exp(μ)."""

import math

import numpy as np
import pytest
import torch

from distar.backbones.base import OneStepGenerator
from distar.backbones.flux import Flux, PromptEncoder, build_tiny_flux, pack
from distar.diffusion import FlowSchedule

PROMPTS = ["a red cube", "café &amp; croissant"]


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def family(request, tmp_path_factory):
    from diffusers import FluxPipeline

    root = build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", guidance_embeds=request.param)
    pipe = FluxPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return root, pipe, PromptEncoder.from_pretrained(root)


def test_the_stock_pipelines_one_step_is_the_generator(family):
    _, pipe, encoder = family
    cond = encoder.encode(PROMPTS, 16, 16)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
    # the same code on another load of the same weights (T5 agrees to ~1e-5 across the two)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    backbone = Flux()
    with torch.no_grad():
        x0 = OneStepGenerator(pipe.transformer, backbone=backbone)(z, cond)
        kwargs = dict(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                      num_inference_steps=1, height=16, width=16)  # fmt: skip
        # the pipeline takes and returns packed latents; guidance_scale is embedded where the network has it
        stock = pipe(latents=pack(z), guidance_scale=1.0, output_type="latent", **kwargs).images
        torch.testing.assert_close(stock, pack(x0), rtol=1e-5, atol=1e-5)
        image = pipe(latents=pack(z), guidance_scale=1.0, output_type="pt", **kwargs).images
        torch.testing.assert_close(backbone.decode(pipe.vae, x0), image, rtol=1e-4, atol=1e-4)
        if pipe.transformer.config.guidance_embeds:  # dev's kind: the reference at g = 3.5 is one call
            guided = pipe(latents=pack(z), guidance_scale=3.5, output_type="latent", **kwargs).images
            v = backbone.velocity(pipe.transformer, z, torch.ones(2), cond, guidance=3.5)
            torch.testing.assert_close(guided, pack(z - v), rtol=1e-5, atol=1e-5)


def test_fluxs_resolution_dependent_shift_is_a_static_shift_of_exp_mu():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, **config)
    for side in (64, 128):  # latents of 512² and 1024² images
        mu = calculate_shift((side // 2) ** 2, 256, 4096, 0.5, 1.15)
        shift = Flux.shift_for(side, side, config)
        assert shift == pytest.approx(math.exp(mu))
        sigmas = np.linspace(1.0, 1 / 8, 8)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        ours = FlowSchedule(shift=shift).shifted(torch.tensor(sigmas))
        torch.testing.assert_close(ours, scheduler.sigmas[:-1].double(), rtol=1e-6, atol=1e-6)
