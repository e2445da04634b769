"""docs/PERFORMANCE.md from the results benchmarks/run.py measured; the GPU analysis cites the torch.profiler tables
stored beside the GPU runs in docs/gpu/."""

from __future__ import annotations

GiB = 2**30


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.2f} s"


def _anatomy(name: str, a: dict) -> list[str]:
    lines = [
        f"### {name} ({a['arch']} networks, preset {a['preset']}, {' '.join(a['overrides'])}; "
        f"K_TA = {a['assistant_updates']})",
        "",
        "| part | median |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_ms(v)} |" for k, v in a["median_s"].items()]
    lines += ["", "| timed whole | whole | sum of parts | whole / parts |", "|---|---|---|---|"]
    for key in ("assistant_update", "generator_update", "iteration"):
        w = a[key]
        lines.append(f"| {key.replace('_', ' ')} | {_ms(w['whole_s'])} | {_ms(w['parts_s'])} | {w['overhead']:.3f} |")
    return lines + [""]


def _passes(passes: dict) -> list[str]:
    lines = ["| network | forward | backward | recomputed forward (checkpointing) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['forward']} | {v['backward']} | {v['recompute']} |" for k, v in passes.items()]
    return lines


def performance_markdown(r: dict) -> str:
    tiny, medium = r["anatomy"]["tiny"], r["anatomy"]["medium"]
    s, c, m = r["sampling"], r["curation"], r["memory"]
    worst = max(a["iteration"]["overhead"] for a in r["anatomy"].values())
    out = [
        "# Performance",
        "",
        f"Measured by `make bench` on {r['date']} ({r['machine']}, torch {r['torch']}) unless a section names a GPU. "
        "Each figure is a ratio of measurements taken side by side in the same run (medians after a warm-up). "
        "The numbers are in docs/performance.json; GPU runs of benchmarks/gpu_sdxl_step.py are in docs/gpu/.",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| step overhead ≤ 1.10 × sum of parts (CPU presets) | {worst:.3f} (worst iteration) | "
        f"{'met' if worst <= 1.10 else 'not met'} |",
        f"| one step ≤ 3 % of 50-step CFG | {100 * s['ratio']:.2f} % (CPU, tiny)"
        + "".join(
            f"; {100 * g['sampling']['ratio']:.2f} % ({g['device']}, SDXL 1024²)" for g in r["gpu"] if "sampling" in g
        )
        + f" | {'met' if s['ratio'] <= 0.03 else 'not met'} |",
        f"| curation ≥ 1,000,000 prompts/min on 2 cores | {c['distar_prompts_per_min']:,.0f} /min | "
        f"{'met' if c['distar_prompts_per_min'] >= 1e6 else 'not met'} |",
        f"| curation ≥ 10 × plain Python | {c['speedup']:.2f} × | {'met' if c['speedup'] >= 10 else 'not met'} |",
    ]
    ratios = [v["ratio"] for v in m["cpu"].values()] + [v["ratio"] for v in m["gpu"].values()]
    within = all(abs(x - 1) <= 0.15 for x in ratios)
    out.append(
        "| `distar plan` within 15 % of the measured peak | "
        + ", ".join(f"{k}: {100 * (v['ratio'] - 1):+.1f} %" for k, v in {**m["cpu"], **m["gpu"]}.items())
        + f" | {'met' if within else 'not met on every preset'} |"
    )
    sdxl = m["sdxl_8x80"]
    out.append(
        f"| SDXL plan fits 80 GB per GPU on 8 GPUs at 2 img/GPU, 1024² | {sdxl['peak_bytes'] / GiB:.1f} GiB "
        f"predicted | {'met' if sdxl['peak_bytes'] / GiB <= 79.6 else 'not met'} |"
    )
    for g in r["gpu"]:
        if "mfu" in g or "iteration_s" in g:
            mfu = _mfu(g, r)
            out.append(
                f"| MFU of the DI* iteration ≥ 35 % in bf16 (H100) | {100 * mfu:.1f} % on {g['device']} | "
                f"not met: see §5 |"
                if mfu < 0.35
                else f"| MFU ≥ 35 % | {100 * mfu:.1f} % | met |"
            )
    out += [
        "",
        "## 1. Training-step anatomy",
        "",
        "The trainer's own `train_step`, `assistant_update` and `generator_update` timed whole, and each network "
        "pass of them timed alone on the same networks and inputs (benchmarks/anatomy.py), in interleaved rounds. "
        "The generator update's parts: the generator forward+backward, the VAE decode and the reward with the "
        "backward to their inputs, the frozen assistant and the CFG reference (one pass on 2B) with the backward "
        "to x_t, the optimizer (clip, finite check on every rank, AdamW).",
        "",
    ]
    out += _anatomy("tiny", tiny) + _anatomy("medium", medium)
    updates = [a[k]["overhead"] for a in r["anatomy"].values() for k in ("assistant_update", "generator_update")]
    rounds = ", ".join(f"{name} {a['repeats']}" for name, a in r["anatomy"].items())
    out += [
        f"The iteration's whole ÷ parts is at most {worst:.3f}; the single updates range from {min(updates):.3f} "
        f"to {max(updates):.3f}. Timings on this 2-core virtual machine scatter by about ±10 % from round to "
        f"round (medians of {rounds} rounds); the glue around the passes (noise draws, the "
        "loss algebra, the scalar reads for logging, the finite check) is not separable from that scatter: the "
        "iteration is its network passes.",
        "",
        "Network passes per iteration (batches of B; the reference's CFG pass is one pass on 2B), sdxl preset "
        "(K_TA = 5, checkpointing on):",
        "",
    ]
    gpu = next((g for g in r["gpu"] if "anatomy" in g), None)
    out += _passes(gpu["anatomy"]["passes"] if gpu else tiny["passes"])
    out += [
        "",
        "## 2. Sampling: one step against the reference's 50-step CFG sampling",
        "",
        f"CPU, tiny preset, stock diffusers StableDiffusionXLPipeline, batch {s['batch']}, latents only: one step "
        f"(LCMScheduler at t = 399, no guidance) {_ms(s['one_step_s'])} against 50 Euler steps with CFG 7.5 "
        f"{_ms(s['fifty_step_cfg_s'])}: **{100 * s['ratio']:.2f} %**. One step is one UNet pass on B; 50 CFG steps "
        "are 50 passes on 2B, so the UNet-bound ratio is about 1/50 × cost(B)/cost(2B). The paper reports 1.88 % "
        "for DI* against FLUX-dev.",
    ]
    for g in r["gpu"]:
        if "sampling" in g:
            gs = g["sampling"]
            out.append(
                f"On {g['device']} (SDXL UNet in bf16, 1024², batch 1, §5): {_ms(gs['one_step_s'])} against "
                f"{_ms(gs['many_step_cfg_s'])}, **{100 * gs['ratio']:.2f} %**."
            )
    out += [
        "",
        "## 3. Curation",
        "",
        f"{c['prompts']:,} synthetic prompts (an image-prompt vocabulary, 3–24 words, stray whitespace, 2 % "
        f"repeats) in one Parquet file; tokenizer: {c['tokenizer']}.",
        "",
        "| | seconds | prompts / min |",
        "|---|---|---|",
        f"| `distar curate` | {c['distar_s']:.1f} | {c['distar_prompts_per_min']:,.0f} |",
        f"| plain Python, same rules, one tokenizer call per prompt | {c['plain_python_s']:.1f} | "
        f"{c['plain_python_prompts_per_min']:,.0f} |",
        f"| the batched Rust tokenizer alone, on the same prompts | {c['tokenizer_alone_s']:.1f} | |",
        "",
        f"Speed-up **{c['speedup']:.1f} ×**; both keep {c['rows_out']:,} prompts (same count: "
        f"{c['same_rows_out']}). Where the time goes: the plain version spends most of it in one tokenizer call "
        "per prompt (the library's per-call overhead, then offsets for every token). `distar curate` normalises "
        "in Arrow kernels (NFC, Python's whitespace set as one RE2 class, trim), then counts CLIP tokens once per "
        "distinct word: CLIP's normaliser and pre-tokenizer never put a space inside a pre-token and its BPE "
        "works per pre-token, so a normalised prompt's count is the sum of its words' counts, and a prompt set "
        "reuses a small vocabulary. The identity is checked against the tokenizer on the first 256 prompts of "
        "every batch (a tokenizer for which it fails is used whole); a prompt over the limit is cut inside the one "
        "word that holds its last token, the only word tokenized with offsets (checked likewise). What is left "
        "is hashing (BLAKE2b per prompt for the dedupe and the split) and moving strings between Arrow and "
        "Python. For reference, the batched Rust tokenizer run once over every prompt alone takes "
        f"{c['tokenizer_alone_s']:.1f} s, "
        f"{c['tokenizer_alone_s'] / c['distar_s']:.1f} × the whole of `distar curate`.",
    ]
    out += [
        "",
        "## 4. Memory: `distar plan`",
        "",
        "`distar plan --config sdxl --gpus 8` predicts each GPU's peak from exact parameter counts (weights, "
        "gradients of one UNet at a time, AdamW states, EMA, FSDP shards and unsharded blocks in flight, "
        "autocast's bf16 weight copies) and activations measured on the meta device: every tensor the generator "
        "update's forward passes save for backward, counted by storage, with fused attention's saved set. The "
        "peak is the largest of its phases (the backward through the frozen networks, the generator's "
        "backward, the assistant update, the multi-tensor optimizer step).",
        "",
        "| run | measured peak | predicted | predicted / measured |",
        "|---|---|---|---|",
    ]
    for k, v in m["cpu"].items():
        out.append(
            f"| {k} (CPU, peak of live tensor bytes over 3 iterations) | {v['measured_bytes'] / GiB:.3f} GiB | "
            f"{v['predicted_bytes'] / GiB:.3f} GiB | {v['ratio']:.3f} |"
        )
    for k, v in m["gpu"].items():
        out.append(
            f"| SDXL, 1 × {k}, unsharded, 2 img 1024², bf16, checkpointing ({v['date'][:10]}; "
            f"torch.cuda.max_memory_allocated) | {v['measured_bytes'] / GiB:.2f} GiB | "
            f"{v['predicted_bytes'] / GiB:.2f} GiB | {v['ratio']:.3f} |"
        )
    out += [
        "",
        "On the CPU the measure is benchmarks/memory_probe.py's count of live tensor bytes (every storage an "
        "operation creates, from its creation to its release, plus the networks' weights), the counterpart of "
        "the GPU allocator's own count; the resident set of those processes also holds the Python runtime and "
        "the libraries (about 0.5 GiB) and is not what the plan predicts.",
        "",
        "The SDXL plan on 8 × 80 GB GPUs (FSDP over 8, 2 images per GPU at 1024², bf16, checkpointing):",
        "",
        "```",
        _plan_text(sdxl),
        "```",
    ]
    out += _gpu_section(r)
    if "compile" in r:
        k = r["compile"]
        out += [
            "",
            "## 6. Regional compilation (CPU)",
            "",
            "The tiny UNet's forward and backward with every block compiled in place (`parallel.compile`, "
            "torch.compile with inductor) against the same network eager, in interleaved rounds after a warm-up "
            "call that pays the compile.",
            "",
            "| eager | compiled | compiled / eager | first call (compile) | max output difference |",
            "|---|---|---|---|---|",
            f"| {_ms(k['eager_s'])} | {_ms(k['compiled_s'])} | {k['ratio']:.2f} | {k['first_call_s']:.1f} s | "
            f"{k['max_abs_diff']:.1e} |",
            "",
            "A CPU ratio says nothing of a GPU's, where compilation exists to cut kernel launches: the GPU variant "
            "`autocast+fused+compile` of benchmarks/gpu_sdxl_step.py measures that.",
        ]
    if "precision" in r:
        out += _precision_section(r["precision"])
    return "\n".join(out) + "\n"


def _precision_section(p: dict) -> list[str]:
    w, cl, v = p["weight_copies"], p["channels_last"], p["vae_bf16"]
    rows = [
        f"| bf16 VAE, {norms} GroupNorm | {e['mean_abs_error_255']:.2f} | {e['max_abs_error_255']:.1f} | "
        f"{e['psnr_db']:.1f} dB | {e['grad_cosine']:.5f} | {e['grad_relative_error']:.3f} | "
        f"{e['seconds'] / v['fp32_s']:.2f} |"
        for norms, e in (("fp32", v["bf16_fp32_norms"]), ("bf16", v["bf16"]))
    ]
    return [
        "",
        "## 7. Precision and layout (CPU)",
        "",
        "Each option against the default, side by side in interleaved rounds after a warm-up. A CPU ratio says "
        "little of a GPU's: the GPU variants `autocast+fused+copies` and `autocast+fused+copies+nhwc+vae-bf16` of "
        "benchmarks/gpu_sdxl_step.py measure those.",
        "",
        f"**bf16 weight copies made once** (`parallel.bf16_weight_copies`), medium networks, bf16 autocast, "
        "K_TA = 5: the five generator samples of an iteration "
        f"{_ms(w['samples_copies_s'])} against {_ms(w['samples_autocast_s'])} with autocast's casts "
        f"({w['samples_ratio']:.2f}); the whole iteration {_ms(w['iteration_copies_s'])} against "
        f"{_ms(w['iteration_autocast_s'])} ({w['iteration_ratio']:.2f}). Same losses, norms and rewards to the last "
        f"bit: {w['same_values']}. On this CPU a cast is cheap next to a bf16 matrix product and the rounds scatter "
        "by about ±10 %: the ratio to look for is the GPU's, where each cast is a kernel launch.",
        "",
        f"**channels_last** (`parallel.channels_last`), the medium UNet's forward and backward at "
        f"{cl['latent_side']}² latents: {_ms(cl['channels_last_s'])} against {_ms(cl['default_s'])} "
        f"({cl['ratio']:.2f}); largest output difference {cl['max_abs_diff']:.1e}.",
        "",
        f"**The VAE decoder in bf16**: the SDXL VAE (published architecture, random weights) decoding one "
        f"{v['side']}² image and sending a fixed linear reward's gradient back to the latents, against fp32 "
        f"({v['fp32_s']:.1f} s). Errors in 8-bit pixel levels (1/255) of the clamped [0, 1] image.",
        "",
        "| | mean abs error | max abs error | PSNR | gradient cosine | gradient relative error | time / fp32 |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The bound the tests hold (tests/integration/test_precision.py, tiny VAE): mean absolute error under one "
        "pixel level and gradient cosine above 0.99. Random weights are not the trained VAE's: its activations "
        "differ, so the real weights' error is still to be measured where they can be loaded.",
    ]


def _plan_text(result: dict) -> str:
    from distar.plan import format_plan

    return format_plan(result, 79.6)


def _best_iteration_s(g: dict) -> float:
    return min(g[v]["iteration_s"] for v in g["variants"] if "iteration_s" in g.get(v, {}))


def _mfu(g: dict, r: dict, seconds: float | None = None) -> float:
    """Model FLOPs per second over the card's datasheet dense bf16 peak (gpu_sdxl_step.PEAK_BF16), at `seconds` per
    iteration (the fastest variant by default)."""
    from gpu_sdxl_step import datasheet_peak

    flops = r.get("sdxl_model_flops", {}).get("model", {}).get("iteration") or g.get("model_flops_per_iteration")
    return flops / (seconds or _best_iteration_s(g)) / datasheet_peak(g["device"])


def _peak_tflops(g: dict) -> str:
    from gpu_sdxl_step import datasheet_peak

    return f"{datasheet_peak(g['device']) / 1e12:g}"


def _gpu_section(r: dict) -> list[str]:
    out = ["", "## 5. The DI* iteration at SDXL scale on a GPU", ""]
    if not r["gpu"]:
        return out + [
            "No GPU run is recorded yet: run `python benchmarks/gpu_sdxl_step.py --out docs/gpu/CARD_DATE.json`."
        ]
    flops = r.get("sdxl_model_flops", {})
    model = flops.get("model", {}).get("iteration")
    hardware = flops.get("with_checkpointing", {}).get("iteration")
    for g in r["gpu"]:
        out += [
            f"### {g['device']}, {g['date'][:10]}, torch {g['torch']} ({g['file']})",
            "",
            f"benchmarks/gpu_sdxl_step.py: the SDXL UNet ×3 (2,567,463,684 parameters each, random weights, the "
            f"published config), the SDXL VAE, a CLIP ViT-H/14 reward (PickScore's shape), {g['batch']} images at "
            f"{g['resolution']}², the sdxl preset (K_TA = 5, bf16, activation checkpointing of the UNets' blocks "
            "and the VAE decoder's ResNets), one GPU, no sharding.",
            "",
            f"| variant | iteration | images / s | peak allocated | MFU ({_peak_tflops(g)} TFLOP/s dense bf16) |",
            "|---|---|---|---|---|",
        ]
        for v in g["variants"]:
            x = g.get(v, {})
            if "iteration_s" not in x:
                out.append(f"| {v} | failed: {x.get('error', '?')} | | | |")
                continue
            scale = x.get("batch", g["batch"]) / g["batch"]  # model FLOPs grow with the batch
            mfu = f"{100 * scale * _mfu(g, r, x['iteration_s']):.1f} %" if model else "—"
            out.append(
                f"| {v} | {x['iteration_s']:.2f} s | {x['images_per_s']:.2f} | "
                f"{x['memory_iterations']['peak_allocated_gb']:.1f} GiB | {mfu} |"
            )
        if model:
            best = _best_iteration_s(g)
            out += [
                "",
                f"Model FLOPs per iteration, counted with torch.utils.flop_counter on the meta device without "
                f"checkpointing: {model / 1e12:.1f} TFLOP; with the recomputation {hardware / 1e12:.1f} TFLOP, "
                f"and {g['hardware_flops_counted'] / 1e12:.1f} TFLOP counted on the GPU itself (its fused "
                f"attention kernels are counted there). Achieved: {model / best / 1e12:.0f} TFLOP/s of model "
                "FLOPs, "
                f"{100 * model / best / g['matmul_bf16_flops']:.1f} % of the "
                f"{g['matmul_bf16_flops'] / 1e12:.0f} "
                "TFLOP/s that an 8192³ bf16 matrix product reached on the same card in the same run.",
            ]
        if "anatomy" in g:
            a = g["anatomy"]
            out += ["", "Anatomy on the GPU (the fsdp+fused variant):", ""]
            out += ["| part | median |", "|---|---|"] + [f"| {k} | {_ms(v)} |" for k, v in a["median_s"].items()]
            out += ["", f"Iteration whole ÷ parts: {a['iteration']['overhead']:.3f}."]
        if g.get("attention_kernels"):
            kernels = ", ".join(f"`{k}` ×{n}" for k, n in sorted(g["attention_kernels"].items()))
            out += ["", f"Attention kernels of one reference pass (CFG, 2B): {kernels}."]
    free_8x80 = 79.6 - r["memory"]["sdxl_8x80"]["peak_bytes"] / GiB
    out += [
        "",
        "**Why the MFU is low, and what would fix it.** The profiles (docs/gpu/*_profile.txt, one "
        "iteration under torch.profiler) show the GPU busy for about 2.9 s of a 5.3 s iteration: the iteration is "
        "bound by the host, which issues about 100,000 small operations (diffusers' UNet is many small kernels at "
        "2 × 128² latents; each matrix product averages 16 µs). Of the GPU time, about 17 % is copies (autocast's "
        "per-operation casts of the fp32 weights to bf16, layout conversions for cuDNN), 12 % AdamW over "
        "2 × 2.57 B "
        "parameters, and 12 % the VAE decoder's fp32 GroupNorm at 1024² (memory-bound); FSDP2 on a single GPU "
        "only adds its per-block copy-in (the fsdp+fused variant is slower; on 8 GPUs the same copies are the "
        "all-gathers it exists for).",
        "",
        "**What is built against it, each a switch with a variant of benchmarks/gpu_sdxl_step.py, none measured "
        "on a GPU yet:** regional compilation of each UNet block and the VAE decoder (`parallel.compile`, the "
        "`+compile` variants), to fuse the norms and element-wise work and cut launches; bf16 weight copies made "
        "once for the passes whose weights cannot change (`parallel.bf16_weight_copies`, `+copies`: the K_TA "
        "generator samples and the frozen assistant stop casting every weight on every call); no host sync "
        "between log steps, the non-finite skip decided on the device by fused AdamW (`fused` variants); "
        "channels_last convolutions (`+nhwc`); the VAE decoder in bf16 with fp32 GroupNorm (`+vae-bf16`, its "
        "error in §7); a larger batch per GPU (`--largest-batch VARIANT` runs one at the largest batch "
        f"`distar plan` fits; on 8 GPUs with FSDP the plan leaves {free_8x80:.0f} GiB of an 80 GB card free at 2 "
        "images). Still open: CUDA graphs for the fixed-shape passes.",
    ]
    return out
