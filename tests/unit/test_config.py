"""Config choices come from Literal types: the loader and `validate` refuse a value outside them, naming the key and
the closest valid value; the trainer's loss config and the 2-D lab share one divergence config."""

import dataclasses

import pytest

from distar.config import apply_mapping, apply_overrides
from distar.errors import UserError
from distar.losses import DivergenceConfig
from distar.toy import ToyConfig
from distar.train.config import LossConfig, TrainConfig, load_config


@pytest.mark.parametrize(
    "override,closest",
    [("loss.divergence=scor", "score"), ("loss.distance=pseudohuber", "pseudo_huber"), ("loss.form=ful", "full"),
     ("loss.weighting=sigma_2", "sigma2"), ("loss.cfg=rewards", "reward"), ("parallel.strategy=fsdp2", "fsdp"),
     ("parallel.mixed_precision=bf161", "bf16"), ("generator_optim.implementation=fuse", "fused")],
)  # fmt: skip
def test_an_unknown_choice_names_the_key_and_the_closest_value(override, closest):
    key = override.split("=")[0]
    with pytest.raises(UserError) as err:
        load_config("tiny", [override])
    assert f"config key {key!r}" in str(err.value) and f"did you mean {closest!r}" in str(err.value)


def test_file_values_and_configs_built_in_code_are_checked_too():
    with pytest.raises(UserError, match="did you mean 'kl'"):
        apply_mapping(TrainConfig(), {"loss": {"divergence": "kll"}}, source="run.toml")
    config = TrainConfig()
    config.data.prompts = "x"
    config.parallel.device = "gpu"
    with pytest.raises(UserError, match="config key 'parallel.device'"):
        config.validate()


def test_the_divergence_fields_are_shared_and_keep_their_flat_keys():
    names = {f.name for f in dataclasses.fields(DivergenceConfig)}
    assert names <= {f.name for f in dataclasses.fields(LossConfig)}
    assert names <= {f.name for f in dataclasses.fields(ToyConfig)}
    toy = apply_overrides(ToyConfig(), ["divergence=kl", "distance=l2"])
    assert toy.loss_kwargs()["divergence"] == "kl" and toy.loss_kwargs()["distance"] == "l2"
    with pytest.raises(UserError, match="did you mean 'l2'"):
        apply_overrides(ToyConfig(), ["distance=l3"])


def test_cli_flags_come_from_the_config_dataclasses():
    """distar curate and distar evaluate build their flags from CurateConfig and EvaluateConfig: one flag per
    field, typed, defaults and help from the field, and the dataclass rebuilt from the parsed flags."""
    import dataclasses

    from distar.cli import build_parser
    from distar.curate import CurateConfig
    from distar.evaluate import EvaluateConfig

    parser = build_parser()
    args = parser.parse_args(["curate", "--source", "a.tsv", "--source", "b.csv", "--out", "o", "--max-tokens", "20"])
    from distar.config import config_from_args

    curate = config_from_args(CurateConfig, args)
    assert curate.sources == ["a.tsv", "b.csv"] and curate.max_tokens == 20 and curate.long_prompts == "truncate"
    assert {f.name for f in dataclasses.fields(CurateConfig)} <= set(vars(args))
    args = parser.parse_args(["evaluate", "--model", "m", "--out", "o", "--source", "clip=tiny:rewards/clip",
                              "--rewards", "clip", "pickscore", "--allow-protocol-mismatch"])  # fmt: skip
    evaluate = config_from_args(EvaluateConfig, args)
    assert evaluate.sources == {"clip": "tiny:rewards/clip"} and evaluate.rewards == ["clip", "pickscore"]
    assert evaluate.allow_protocol_mismatch and evaluate.t_star is None and evaluate.seed == EvaluateConfig("", "").seed
    help_text = parser._subparsers._group_actions[0].choices["curate"].format_help()
    assert "Deduplicate ignoring case." in help_text and "(default: 0.02)" in help_text
    with pytest.raises(SystemExit):  # a bad NAME=VALUE is argparse's own usage error
        parser.parse_args(["evaluate", "--model", "m", "--out", "o", "--source", "clip"])
    with pytest.raises(SystemExit):
        parser.parse_args(["curate", "--source", "a", "--out", "o", "--long-prompts", "cut"])


def test_curate_takes_its_token_limit_from_the_backbone_and_names_an_unknown_one(tmp_path):
    from distar import backbones
    from distar.curate import CurateConfig, curate

    assert CurateConfig([], "").max_tokens is None and backbones.get("sdxl").max_prompt_tokens == 77
    assert backbones.get("sd3").max_prompt_tokens == backbones.get("flux").max_prompt_tokens == 77  # CLIP's limit
    with pytest.raises(UserError, match="--backbone 'kandinsky': choose one of sdxl, sd3, flux"):
        curate(CurateConfig(["x.tsv"], str(tmp_path / "o"), backbone="kandinsky"))


def test_a_run_length_in_kimg_sets_the_updates_from_the_global_batch():
    config = load_config("tiny", ["kimg=1", "data.batch_size=2", "data.grad_accum=3", "steps=7"])
    assert config.total_steps(2) == 84  # ⌈1000 / (2 · 2 · 3)⌉
    assert load_config("tiny", ["steps=7"]).total_steps(8) == 7  # no kimg: steps
    with pytest.raises(UserError, match="kimg"):
        load_config("tiny", ["kimg=-1"])


def test_alpha_cfg_is_read_under_its_convention():
    assert load_config("tiny", ["loss.alpha_cfg=7.5"]).loss.guidance_scale() == 7.5
    conditional = load_config("tiny", ["loss.alpha_cfg=0", "loss.cfg_convention=conditional"])
    assert conditional.loss.guidance_scale() == 1.0  # the conditional model, no guidance
    with pytest.raises(UserError, match="did you mean 'conditional'"):
        load_config("tiny", ["loss.cfg_convention=conditonal"])


def test_di_star_out_and_normaliser_keys_are_checked_against_the_loss_they_shape():
    own = load_config("tiny", ["loss.cfg=reward", "loss.cfg_t_min=500", "loss.cfg_weighting=sigma2"]).loss
    assert own.cfg_own_noise() and own.cfg_range() == (500, own.t_max) and own.cfg_weighting == "sigma2"
    assert not load_config("tiny", ["loss.cfg=reward"]).loss.cfg_own_noise()
    with pytest.raises(UserError, match="DI\\*-OUT"):
        load_config("tiny", ["loss.cfg_t_max=600"])  # CFG inside the divergence has no term of its own
    with pytest.raises(UserError, match="cfg_t_min=990, loss.cfg_t_max=980"):
        load_config("tiny", ["loss.cfg=reward", "loss.cfg_t_min=990"])
    with pytest.raises(UserError, match="did you mean 'sigma'"):
        load_config("tiny", ["loss.cfg=reward", "loss.cfg_weighting=sigma3"])
    with pytest.raises(UserError, match="kl_normalise"):
        load_config("tiny", ["loss.divergence=kl", "loss.score_normalise=true"])
