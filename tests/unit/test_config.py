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
