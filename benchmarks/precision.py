"""make bench §7: precision and layout options on the CPU, each against the default side by side in one run.

- bf16 weight copies made once (parallel.bf16_weight_copies) against autocast's per-call casts: the K_TA generator
  samples and the whole iteration of the medium networks under bf16 autocast; the losses must be the same bits.
- channels_last (parallel.channels_last) against the default layout: the medium UNet's forward and backward.
- The SDXL VAE decoder (the published architecture, random weights) in bf16 with fp32 GroupNorm, and in plain
  bf16, against fp32 at 512² (at 1024² the fp32 decoder's activations for the backward outgrow this machine's
  24 GB): pixel error of the decode and error of the gradient a reward sends back through it.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import anatomy
import torch

from distar.models.architectures import ARCHITECTURES

MEDIUM_BF16 = ["parallel.strategy=none", "data.resolution=128", "parallel.mixed_precision=bf16", "assistant_updates=5"]


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, timed in interleaved rounds after one warm-up call each."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def weight_copies(repeats: int) -> dict:
    from distar.train.trainer import host_values

    with tempfile.TemporaryDirectory() as tmp:
        arch = ARCHITECTURES["medium"]()
        torch.manual_seed(0)
        plain = anatomy.build_trainer(arch, "tiny", MEDIUM_BF16, Path(tmp) / "plain")
        torch.manual_seed(0)
        copies = anatomy.build_trainer(
            arch, "tiny", [*MEDIUM_BF16, "parallel.bf16_weight_copies=true"], Path(tmp) / "copies"
        )
        values = [host_values(t.train_step()) for t in (plain, copies)]
        identical = {k: v for k, v in values[0].items() if not k.startswith("ok/")} == {
            k: v for k, v in values[1].items() if not k.startswith("ok/")
        }
        batches = plain.method.micro_batches(0)
        _, _, cond = batches[0]
        z = torch.randn(plain.config.data.batch_size, *plain.latent_shape, generator=torch.Generator().manual_seed(0))

        def samples(trainer):
            def run():
                with torch.no_grad(), trainer.method.frozen_generator():
                    for _ in range(trainer.config.assistant_updates):
                        with trainer.autocast:
                            trainer.nets.generator(z, cond)

            return run

        # this 2-core machine's timings scatter by ±10 %: more rounds, medians
        k = _interleaved({"autocast": samples(plain), "copies": samples(copies)}, 2 * repeats + 1)
        whole = _interleaved({"autocast": plain.train_step, "copies": copies.train_step}, repeats)
    return {
        "arch": "medium",
        "overrides": MEDIUM_BF16,
        "samples_autocast_s": k["autocast"],
        "samples_copies_s": k["copies"],
        "samples_ratio": k["copies"] / k["autocast"],
        "iteration_autocast_s": whole["autocast"],
        "iteration_copies_s": whole["copies"],
        "iteration_ratio": whole["copies"] / whole["autocast"],
        "same_values": identical,
    }


def channels_last(repeats: int) -> dict:
    from diffusers import UNet2DConditionModel

    from distar.train.precision import to_channels_last

    arch = ARCHITECTURES["medium"]()
    torch.manual_seed(0)
    default = UNet2DConditionModel(**arch.unet)
    nhwc = copy.deepcopy(default)
    to_channels_last(nhwc)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, arch.unet["in_channels"], 16, 16, generator=g), torch.tensor([300, 800])
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 77, arch.text_dim, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, arch.pooled_dim, generator=g),
            "time_ids": torch.zeros(2, 6),
        },
    }

    def step(unet):
        def run():
            out = unet(x, t, **kwargs).sample
            out.square().mean().backward()
            unet.zero_grad(set_to_none=True)
            return out.detach()

        return run

    diff = float((step(default)() - step(nhwc)()).abs().max())
    s = _interleaved({"default": step(default), "channels_last": step(nhwc)}, repeats)
    return {
        "arch": "medium",
        "latent_side": 16,
        "default_s": s["default"],
        "channels_last_s": s["channels_last"],
        "ratio": s["channels_last"] / s["default"],
        "max_abs_diff": diff,
    }


def vae_bf16(side: int = 512) -> dict:
    """Decode and the gradient to the latents (what the reward's backward crosses) of the SDXL VAE decoder at
    `side`² pixels, bf16 with fp32 norms and plain bf16 against fp32, from the same random weights and latents."""
    from diffusers import AutoencoderKL

    from distar.backbones.sdxl import SDXL_VAE_CONFIG, decode
    from distar.train.precision import fp32_norms

    torch.manual_seed(0)
    fp32 = AutoencoderKL(**SDXL_VAE_CONFIG).eval().requires_grad_(False)
    normed = copy.deepcopy(fp32).to(torch.bfloat16)
    fp32_norms(normed)
    plain = copy.deepcopy(fp32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, side // 8, side // 8, generator=g).requires_grad_(True)
    weights = torch.rand(1, 3, side, side, generator=g)  # a fixed linear "reward" of the pixels

    def run(vae):
        start = time.perf_counter()
        images = decode(vae, x0)
        (grad,) = torch.autograd.grad((images * weights).sum(), x0)
        return images.detach(), grad, time.perf_counter() - start

    want, want_grad, fp32_s = run(fp32)
    out = {"side": side, "fp32_s": fp32_s}
    for name, vae in (("bf16_fp32_norms", normed), ("bf16", plain)):
        images, grad, seconds = run(vae)
        err = images - want
        out[name] = {
            "seconds": seconds,
            "mean_abs_error_255": float(err.abs().mean()) * 255,
            "max_abs_error_255": float(err.abs().max()) * 255,
            "psnr_db": float(10 * torch.log10(1 / err.pow(2).mean())),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0)),
            "grad_relative_error": float((grad - want_grad).norm() / want_grad.norm()),
        }
    return out


def measure(repeats: int) -> dict:
    return {
        "weight_copies": weight_copies(repeats),
        "channels_last": channels_last(repeats),
        "vae_bf16": vae_bf16(),
    }
