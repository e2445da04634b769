"""The tiny SD3 family through the real loaders: stock diffusers' StableDiffusion3Pipeline reads the directory
`build_tiny_sd3` writes, distar's prompt encoder gives its conditioning (the empty prompt as CFG's negative), and
the stock pipeline's one step from σ = 1, with and without CFG, lands on the trainer's maps."""

import pytest
import torch

from distar.backbones.base import OneStepGenerator
from distar.backbones.sd3 import SD3, PromptEncoder, build_tiny_sd3

PROMPTS = ["a red cube", "café &amp; croissant"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    root = build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")
    pipe = StableDiffusion3Pipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return root, pipe, PromptEncoder.from_pretrained(root)


def test_the_prompt_encoder_is_the_pipelines_and_its_null_is_the_empty_prompt(family):
    _, pipe, encoder = family
    cond = encoder.encode(PROMPTS, 16, 16)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, None, None, negative_prompt="")
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled)
    null = cond.null()
    torch.testing.assert_close(null.prompt_embeds, negative)
    torch.testing.assert_close(null.pooled_prompt_embeds, negative_pooled)
    assert cond.prompt_embeds.shape == (2, 77 + 256, 64) and not torch.equal(null.prompt_embeds, embeds)


def test_the_stock_pipelines_one_step_is_the_generator_with_and_without_cfg(family):
    _, pipe, encoder = family
    backbone = SD3()
    cond = encoder.encode(PROMPTS, 16, 16)
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = OneStepGenerator(pipe.transformer, backbone=backbone)(z, cond)
        stock = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                     guidance_scale=1.0, num_inference_steps=1, latents=z, output_type="latent").images  # fmt: skip
        torch.testing.assert_close(stock, x0, rtol=1e-5, atol=1e-5)
        image = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds,
                     guidance_scale=1.0, num_inference_steps=1, latents=z, output_type="pt").images  # fmt: skip
        torch.testing.assert_close(backbone.decode(pipe.vae, x0), image, rtol=1e-4, atol=1e-4)
        # CFG 4.5 against the empty prompt, from the prompts themselves: the reference's velocities at σ = 1
        guided = pipe(PROMPTS, negative_prompt="", guidance_scale=4.5, num_inference_steps=1, latents=z,
                      output_type="latent").images  # fmt: skip
        ones = torch.ones(2)
        v_c, v_u = (backbone.velocity(pipe.transformer, z, ones, c) for c in (cond, cond.null()))
    torch.testing.assert_close(guided, z - (v_u + 4.5 * (v_c - v_u)), rtol=1e-5, atol=1e-5)


def test_latents_round_trip_through_the_vae_with_sd3s_shift(family):
    _, pipe, _ = family
    backbone = SD3()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    latents = backbone.encode(pipe.vae, images, torch.Generator().manual_seed(2))
    posterior = pipe.vae.encode(images * 2 - 1).latent_dist
    expected = (posterior.sample(torch.Generator().manual_seed(2)) - 0.0609) * 1.5305
    torch.testing.assert_close(latents, expected)
    assert latents.shape == (2, 16, 8, 8)
