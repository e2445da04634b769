"""Training checkpoint → a complete diffusers pipeline directory for one-step generation (the backbone's
`pipeline_name`).

The generator's weights are read from the DCP checkpoint in one process, whatever the number of processes that
wrote it. The directory holds the generator's network in half precision (fp16 by default, bf16 or fp32 on request;
stock diffusers loads it in fp32 unless given a torch_dtype), the reference's text encoders, tokenizers and VAE with
their values unchanged (in fp16 where they are fp16 values, as the model cache's SDXL text encoders are), a
scheduler configured for one step at t* (stock diffusers; the model card says how to call it), distar.json (the
run's backbone, t*, precision, losses, rewards and EMA), a model card, the EMA network (unet_ema/) whenever the
run kept one, and optionally a single-file state dict. model_index.json is written last: a reader that finds it
finds a complete pipeline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distar import backbones, sources, storage, tiny_preset
from distar.config import apply_mapping
from distar.errors import UserError
from distar.train.checkpoint import MARKER, Checkpointer, load_unet_weights, read_config, verify_checkpoint
from distar.train.config import ModelConfig, TrainConfig

DTYPES = ("fp16", "bf16", "fp32")


def single_file_name(dtype: str) -> str:
    """The one-file state dict's name (DMD2's layout), by its precision."""
    return f"generator_unet.{dtype}.safetensors"


@dataclass
class ExportConfig:
    checkpoint: str
    """A checkpoint directory (…/checkpoints/step_N) or a run's output URI (its newest complete checkpoint)."""
    out: str
    """Output URI of the pipeline directory."""
    ema: bool | None = None
    """Also write the EMA of the generator's weights (unet_ema/): None, whenever the checkpoint holds it (a run
    with ema_decay > 0); True, required (refused when it does not); False, never."""
    single_file: bool = False
    """Also write the UNet as one safetensors file in DMD2's layout."""
    dtype: str = "fp16"
    """Precision of the generator's network (and of unet_ema/ and the single file): fp16, bf16 or fp32. Half the
    bytes of fp32 (SDXL's UNet: 5.1 GB instead of 10.3 GB); training's weights are fp32, so fp32 keeps them
    exactly."""
    metrics: str | None = None
    """A metrics.json (from `distar evaluate`) to quote in the model card."""
    force: bool = False
    """Write into a non-empty output directory (files of the same names are replaced)."""


def check_out(out: str, checkpoint: str, force: bool) -> None:
    """Refuse an output that would lose files: empty or a root, inside the training run, or non-empty without
    force. Runs before anything is read, so a refusal costs nothing."""
    storage.check_output("--out", out)
    fs, path = storage.filesystem(out)
    path = path.rstrip("/")
    run_uri = checkpoint.rstrip("/").rsplit("/checkpoints/", 1)[0]
    run_fs, run_path = storage.filesystem(run_uri)
    run_path = run_path.rstrip("/")
    if type(fs) is type(run_fs) and (path == run_path or path.startswith(run_path + "/")):
        raise UserError(f"--out {out!r} is inside the training run {run_uri!r}; export next to it, not into it")
    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"--out {out!r} is a file; name a directory")
    if fs.exists(path) and fs.ls(path) and not force:
        raise UserError(
            f"--out {out!r} is not empty; choose an empty or new directory, or pass --force to write into it"
        )


def resolve_checkpoint(uri: str) -> str:
    """A complete checkpoint directory from a checkpoint or run URI; a clear error otherwise."""
    fs, path = storage.filesystem(uri)
    path = path.rstrip("/")
    if fs.exists(f"{path}/{MARKER}"):
        return uri.rstrip("/")
    if path.endswith("/best") and not fs.exists(path):  # RUN/best: the checkpoint the guardrails kept
        run = uri.rstrip("/")[: -len("/best")]
        from distar.train.distributed import World

        ckpt = Checkpointer(run, World(0, 0, 1, torch.device("cpu")))
        best = ckpt.best()
        if best is None or best not in ckpt.complete_steps():
            raise UserError(f"{uri!r}: the run has no best checkpoint (train with guard.* settings to keep one)")
        return ckpt.uri(best)
    if fs.exists(f"{path}/.metadata"):
        raise UserError(f"checkpoint {uri!r} is incomplete (no {MARKER}); export the run's newest complete one")
    fs_path = f"{path}/checkpoints"
    if fs.exists(fs_path):
        from distar.train.distributed import World

        ckpt = Checkpointer(uri, World(0, 0, 1, torch.device("cpu")))
        latest = ckpt.latest()
        if latest is not None:
            return ckpt.uri(latest)
    raise UserError(f"{uri!r} is neither a complete checkpoint nor a run holding one (checkpoints/step_*/{MARKER})")


def _train_config(checkpoint: str) -> TrainConfig:
    """The run's TrainConfig, as its checkpoint saved it (a config from before a field existed gets the field's
    default, as the run had it)."""
    return apply_mapping(TrainConfig(), read_config(checkpoint), source=f"{checkpoint}/config.json")


def _lora_generator_unet(backbone, model: ModelConfig, hub: dict, adapters: dict[str, torch.Tensor], source: str):
    """A LoRA generator's checkpoint holds its adapters: they go onto the initial network the run started from
    (`model.generator_init`, loaded again) and are merged into its weights, which gives a plain network."""
    from distar.backbones.shared import add_generator_adapter, is_adapter_param, merge_generator_adapter

    unet = backbone.load_generator_init(model.generator_init, model.reference, revision=model.revision, **hub)
    rank, alpha = model.generator_lora_rank, model.generator_lora_alpha
    add_generator_adapter(unet, backbone.lora_targets, rank, alpha)
    expected = {name: p.shape for name, p in unet.named_parameters() if is_adapter_param(name)}
    wrong = [k for k in expected.keys() & adapters.keys() if adapters[k].shape != expected[k]]
    if adapters.keys() != expected.keys() or wrong:
        raise UserError(
            f"{source}: the generator's adapters do not fit a rank-{model.generator_lora_rank} LoRA on "
            f"{model.generator_init!r} ({len(expected.keys() - adapters.keys())} missing, "
            f"{len(adapters.keys() - expected.keys())} unexpected, {len(wrong)} of another shape)"
        )
    unet.load_state_dict(adapters, strict=False)
    return merge_generator_adapter(unet).float()


def holds_fp16_values(module: torch.nn.Module) -> bool:
    """Whether every floating-point weight of `module` is an fp16 value (as parts loaded from fp16 files are, in
    whatever dtype they were loaded): then fp16 stores them exactly, in half the bytes of fp32."""
    return all(
        torch.equal(t, t.half().to(t.dtype))
        for t in (*module.parameters(), *module.buffers())
        if t.is_floating_point() and t.dtype != torch.float16
    )


def _store_reference_parts_exactly(pipe, generator: torch.nn.Module) -> None:
    """The reference's parts (text encoders, VAE) are saved as their values need: fp16 where they hold fp16 values
    (the model cache fetches SDXL's text encoders as fp16 files), else as loaded; the generator is not touched."""
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module) and part is not generator and holds_fp16_values(part):
            part.to(torch.float16)


def export(config: ExportConfig) -> dict:
    if config.dtype not in DTYPES:
        raise UserError(f"--dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    dtype = sources.parse_dtype(config.dtype)
    checkpoint = resolve_checkpoint(config.checkpoint)
    check_out(config.out, checkpoint, config.force)
    verify_checkpoint(checkpoint)  # before anything in it is parsed
    train = _train_config(checkpoint)
    model = train.model
    backbone = backbones.get(model.backbone)
    tiny_preset.prepare(asdict(model))
    hub = sources.hub_options(model.cache_dir, model.offline)
    parts = list(backbone.pipeline_parts) + ([] if model.vae else ["vae"])
    root = backbone.locate(model.reference, parts, revision=model.revision, **hub)
    if model.generator == "lora":
        build = lambda weights: _lora_generator_unet(backbone, model, hub, weights, checkpoint)  # noqa: E731
    else:
        build = lambda weights: backbone.generator_from_weights(root, weights, checkpoint)  # noqa: E731
    unet = build(load_unet_weights(checkpoint, "generator"))
    ema_unet = None
    if config.ema is not False and train.ema_decay > 0:
        ema_unet = build(load_unet_weights(checkpoint, "ema"))
    elif config.ema:
        raise UserError(f"--ema: checkpoint {checkpoint!r} holds no EMA weights (train with ema_decay > 0)")
    unet = unet.to(dtype)
    if ema_unet is not None:
        ema_unet = ema_unet.to(dtype)
    vae = backbone.load_vae(model.vae or root, dtype="fp32", **hub)
    pipe = backbone.one_step_pipeline(root, unet, vae)
    _store_reference_parts_exactly(pipe, unet)
    trainer_state = json.loads(
        storage.filesystem(checkpoint)[0].cat_file(
            f"{storage.filesystem(checkpoint)[1].rstrip('/')}/trainer_state.json"
        )
    )
    metrics = None
    if config.metrics:
        fs, path = storage.filesystem(config.metrics)
        metrics = json.loads(fs.cat_file(path))

    with tempfile.TemporaryDirectory(prefix="distar-export-") as tmp:
        local = Path(tmp) / "pipeline"
        pipe.save_pretrained(local, safe_serialization=True)
        if ema_unet is not None:
            ema_unet.save_pretrained(local / backbone.ema_part)
        if config.single_file:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in unet.state_dict().items()}, str(local / single_file_name(config.dtype))
            )
        distar_meta = {
            "backbone": backbone.name,
            "checkpoint": checkpoint,
            "step": trainer_state["step"],
            "t_star": model.t_star,
            "dtype": config.dtype,
            "reference": model.reference,
            "generator_init": model.generator_init,
            "config_digest": trainer_state.get("config_digest"),
            "ema": None if ema_unet is None else {"part": backbone.ema_part, "decay": train.ema_decay},
            "loss": asdict(train.loss),
            "reward": asdict(train.reward),
        }
        (local / "distar.json").write_text(json.dumps(distar_meta, indent=2))
        (local / "README.md").write_text(
            model_card(backbone, distar_meta, metrics, ema=ema_unet is not None, single_file=config.single_file)
        )
        index = (local / "model_index.json").read_text()
        (local / "model_index.json").unlink()
        fs, out_path = storage.filesystem(config.out)
        out_path = out_path.rstrip("/")
        if fs.exists(f"{out_path}/model_index.json"):  # --force over a pipeline: incomplete until rewritten last
            fs.rm(f"{out_path}/model_index.json")
        if storage.is_uri(config.out) and not config.out.startswith("file://"):
            fs.put(str(local) + "/", out_path, recursive=True)
        else:
            Path(out_path).mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, out_path, dirs_exist_ok=True)
        fs.pipe_file(f"{out_path}/model_index.json", index.encode())
    return {"out": config.out, **distar_meta}


def model_card(backbone, meta: dict, metrics: dict | None, ema: bool, single_file: bool) -> str:
    loss, reward, t = meta["loss"], meta["reward"], meta["t_star"]
    usage = backbone.usage(t)
    lines = [
        "---",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        f"tags: [{', '.join(usage['tags'])}]",
        f"base_model: {meta['reference']}",
        "---",
        "",
        f"# {usage['title']}",
        "",
        f"Trained by distar for {meta['step']} generator updates from `{meta['generator_init']}` against the reference "
        f"`{meta['reference']}` (CFG {loss['alpha_cfg']}, {loss['cfg']}): a {loss['distance']} score divergence "
        f"({loss['divergence']}, c = {loss['huber_c']} in score units) and the reward "
        f"{', '.join(f'{w} × {n}' for n, w in reward['weights'].items())} with α_rew = {loss['alpha_rew']}.",
        "",
        "## Use",
        "",
        "```python",
        *usage["code"],
        "```",
        "",
        usage["how"],
    ]
    if ema:
        lines += ["", f"`unet_ema/` holds the EMA of the generator's weights: {usage['ema']}."]
    dtype = meta.get("dtype", "fp32")
    lines += [
        "",
        f"The generator's network is stored in {dtype}; diffusers loads it in fp32 unless `torch_dtype` says "
        "otherwise. The text encoders and the VAE are the reference's, their values unchanged.",
    ]
    if single_file:
        lines += ["", f"`{single_file_name(dtype)}` is the generator's network as one state dict (DMD2's layout)."]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    lines += [
        "",
        "## Provenance",
        "",
        f"- checkpoint: `{meta['checkpoint']}`",
        f"- config digest: `{meta['config_digest']}`",
        "- method: Luo et al., *Diff-Instruct\\**, arXiv 2410.20898",
    ]
    return "\n".join(lines) + "\n"
