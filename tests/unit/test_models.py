"""SDXL parts on the tiny preset: every loader reads what save_pretrained wrote, and every formula holds."""

import shutil

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from distar.backbones import Assistant, OneStepGenerator, Reference
from distar.backbones.sdxl import PromptEncoder, build_tiny_unet, decode, load_dmd2_unet, load_unet, load_vae, locate
from distar.backbones.sdxl import schedule as sdxl_schedule
from distar.errors import UserError

PROMPTS = ["a red cube on a blue sphere", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def parts(tiny_sdxl):
    encoder = PromptEncoder.from_pretrained(tiny_sdxl)
    unet = load_unet(tiny_sdxl)
    vae = load_vae(tiny_sdxl)
    cond = encoder.encode(PROMPTS, height=64, width=64)
    return encoder, unet, vae, cond


def test_tiny_family_round_trips_through_disk(tiny_sdxl, parts):
    from diffusers import StableDiffusionXLPipeline

    _, unet, _, _ = parts
    fresh = build_tiny_unet(seed=0).state_dict()
    for name, tensor in unet.state_dict().items():
        torch.testing.assert_close(tensor, fresh[name], atol=1e-6, rtol=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    out = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="latent")
    assert out.images.shape == (1, 4, 32, 32)


def test_prompt_encoder_matches_diffusers_sdxl_encoding(tiny_sdxl, parts):
    from diffusers import StableDiffusionXLPipeline

    encoder, _, _, cond = parts
    assert cond.prompt_embeds.shape == (2, 77, 64)  # 32 + 32 hidden sizes, SDXL: 768 + 1280
    assert cond.pooled_prompt_embeds.shape == (2, 32)
    torch.testing.assert_close(cond.add_time_ids, torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.prompt_embeds, embeds)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled)
    cached = PromptEncoder.from_pretrained(tiny_sdxl, cache=True)
    first = cached.encode(PROMPTS[::-1], 64, 64)
    again = cached.encode(PROMPTS, 64, 64)
    torch.testing.assert_close(again.prompt_embeds, cond.prompt_embeds)
    torch.testing.assert_close(first.prompt_embeds, cond.prompt_embeds.flip(0))
    assert len(cached._cache) == 2


def test_generator_x0_is_the_one_step_formula(parts):
    _, unet, _, cond = parts
    gen = OneStepGenerator(unet, t_star=399)
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    x0 = gen(z, cond)
    eps_hat = unet(z, torch.tensor([399, 399]), **cond.unet_kwargs()).sample
    abar = float(sdxl_schedule().alphas_cumprod[399])
    torch.testing.assert_close(x0, (z - (1 - abar) ** 0.5 * eps_hat) / abar**0.5, atol=1e-5, rtol=1e-5)
    other = OneStepGenerator(unet, t_star=250)(z, cond)
    assert not torch.allclose(other, x0)
    with pytest.raises(ValueError, match="t_star"):
        OneStepGenerator(unet, t_star=1000)
    with pytest.raises(ValueError, match="batch size"):
        gen(z[:1], cond)


def test_reference_cfg_combines_both_branches_and_passes_gradient_to_its_input(parts):
    _, unet, _, cond = parts
    ref = Reference(load_unet_copy(unet), guidance_scale=7.5)
    x_t = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    t = torch.tensor([100, 700])
    eps = ref(x_t, t, cond)
    with torch.no_grad():
        e_c = unet(x_t, t, **cond.unet_kwargs()).sample
        e_u = unet(x_t, t, **cond.null().unet_kwargs()).sample
    torch.testing.assert_close(eps, e_u + 7.5 * (e_c - e_u), atol=1e-4, rtol=1e-4)
    assert cond.null().prompt_embeds.abs().sum() == 0 and cond.null().pooled_prompt_embeds.abs().sum() == 0
    eps.pow(2).sum().backward()
    assert x_t.grad is not None and x_t.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ref.parameters())
    torch.testing.assert_close(Reference(ref.unet, 1.0)(x_t, t, cond), e_c, atol=1e-5, rtol=1e-5)
    # the guidance scale as an argument: the same network at another scale, no second Reference
    torch.testing.assert_close(ref(x_t, t, cond, guidance_scale=1.0), e_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref(x_t, t, cond, guidance_scale=4.5), e_u + 4.5 * (e_c - e_u), atol=1e-4, rtol=1e-4)
    assert ref.guidance_scale == 7.5


def load_unet_copy(unet):
    import copy

    return copy.deepcopy(unet)


def test_assistant_is_a_trainable_copy(parts):
    _, unet, _, cond = parts
    ref = Reference(load_unet_copy(unet))
    assistant = Assistant.from_reference(ref.unet)
    assert all(p.requires_grad for p in assistant.parameters())
    assert all(not p.requires_grad for p in ref.parameters())
    x_t = torch.randn(2, 4, 32, 32)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(assistant(x_t, t, cond), Reference(ref.unet, 1.0)(x_t, t, cond))
    with torch.no_grad():
        next(assistant.parameters()).add_(1.0)
    assert not torch.equal(next(assistant.parameters()), next(ref.parameters()))


def test_vae_decode_is_differentiable_and_uses_the_scaling_factor(parts):
    _, _, vae, _ = parts
    assert vae.config.scaling_factor == pytest.approx(0.13025)
    x0 = (0.1 * torch.randn(2, 4, 32, 32)).requires_grad_(True)
    images = decode(vae, x0)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        manual = (vae.decode(x0 / 0.13025).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, manual)
    images.mean().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_dmd2_state_dict_loads_into_the_base_architecture(tiny_sdxl, tmp_path, fmt):
    donor = build_tiny_unet(seed=7)
    state = {k: v.contiguous() for k, v in donor.state_dict().items()}
    path = tmp_path / f"dmd2_unet.{fmt}"
    torch.save(state, path) if fmt == "bin" else save_file(state, str(path))
    unet = load_dmd2_unet(path, tiny_sdxl)
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(v, state[k])
    bad = tmp_path / "bad.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(UserError, match="not an SDXL-UNet state dict"):
        load_dmd2_unet(bad, tiny_sdxl)


def test_missing_files_are_listed_in_one_error(tiny_sdxl, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sdxl, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(UserError) as err:
        locate(broken, ["unet", "tokenizer", "tokenizer_2", "text_encoder", "vae"])
    message = str(err.value)
    assert str(broken) in message and "missing 2 file(s)" in message
    assert "unet: unet/diffusion_pytorch_model.safetensors" in message and "tokenizer_2: " in message
    with pytest.raises(UserError, match="not a directory, a URI or a hub id"):
        load_unet(str(tmp_path / "nowhere" / "x" / "y"))


def test_loads_from_an_fsspec_uri(tiny_sdxl, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTAR_DOWNLOAD_DIR", str(tmp_path / "downloads"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_sdxl) + "/", "/tiny-sdxl/", recursive=True)
    unet = load_unet("memory://tiny-sdxl")
    for k, v in build_tiny_unet(seed=0).state_dict().items():
        torch.testing.assert_close(unet.state_dict()[k], v, atol=1e-6, rtol=0)
    # The finished download is reused: every part loaded from one URI reads one copy.
    fs.rm("/tiny-sdxl", recursive=True)
    assert load_vae("memory://tiny-sdxl").config.scaling_factor == pytest.approx(0.13025)
    assert load_unet(f"file://{tiny_sdxl}").config.cross_attention_dim == 64
    with pytest.raises(UserError, match="does not exist"):
        load_unet("memory://no-such-model")


def test_offline_hub_id_without_cache_fails_clearly(tmp_path):
    with pytest.raises(UserError, match="offline mode is on"):
        load_unet("stabilityai/stable-diffusion-xl-base-1.0", cache_dir=tmp_path, offline=True)


def test_model_cache_is_read_for_hub_ids(tiny_sdxl, tmp_path):
    from distar.cache import CacheItem, cache_models

    cache = tmp_path / "cache"
    cache_models(str(cache), [CacheItem("stabilityai/stable-diffusion-xl-base-1.0", str(tiny_sdxl))], progress=None)
    unet = load_unet("stabilityai/stable-diffusion-xl-base-1.0", cache_dir=cache, offline=True)
    assert unet.config.addition_embed_type == "text_time"


def test_dtype_policy_keeps_the_sdxl_vae_out_of_fp16():
    from distar.backbones.sdxl import DTypePolicy

    assert DTypePolicy().check().vae == "fp32"
    DTypePolicy(vae="fp16").check(vae_source="madebyollin/sdxl-vae-fp16-fix")
    with pytest.raises(UserError, match="fp16-fix VAE"):
        DTypePolicy(vae="fp16").check(vae_source="stabilityai/stable-diffusion-xl-base-1.0")
    with pytest.raises(UserError, match="dtype 'fp8' is not known"):
        DTypePolicy(reference="fp8").check()


def test_reference_runs_in_bf16_with_fp32_io(parts):
    import copy

    _, unet, _, cond = parts
    ref = Reference(copy.deepcopy(unet).to(torch.bfloat16))
    x_t = torch.randn(2, 4, 32, 32)
    out = ref(x_t, torch.tensor([300, 600]), cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    exact = Reference(unet)(x_t, torch.tensor([300, 600]), cond)
    assert (out - exact).abs().mean() < 0.05 * exact.abs().mean() + 0.05


def test_stock_diffusers_one_step_sampling_equals_the_generator(tiny_sdxl, parts):
    """The generator's convention is the one diffusers users run: LCMScheduler, timesteps=[399], no guidance."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    _, unet, _, cond = parts
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    latents = pipe(
        PROMPTS,
        num_inference_steps=1,
        timesteps=[399],
        guidance_scale=0.0,
        height=64,
        width=64,
        latents=z.clone(),
        output_type="latent",
    ).images
    x0 = OneStepGenerator(unet, t_star=399)(z, cond)
    # LCM's boundary condition keeps c_skip ≈ 1.6e-8 of the input: equal to float tolerance.
    torch.testing.assert_close(latents, x0, atol=1e-4, rtol=1e-4)


def test_sdxl_unet_config_has_the_published_parameter_count():
    from diffusers import UNet2DConditionModel

    from distar.backbones.sdxl import SDXL_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


@pytest.mark.parametrize("vae_dtype", [torch.float32, torch.bfloat16])
def test_vae_decode_runs_in_the_vaes_own_dtype_inside_bf16_autocast(parts, vae_dtype):
    """model.vae_dtype is honoured: under the trainer's bf16 autocast an fp32 VAE still decodes in fp32."""
    import copy

    _, _, vae, _ = parts
    vae = copy.deepcopy(vae).to(vae_dtype)
    seen = []
    hook = vae.decoder.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decode(vae, 0.1 * torch.randn(1, 4, 32, 32))
    hook.remove()
    assert seen == [vae_dtype]
