"""Rewards on tiny stand-ins: formulas, gradients to the image, preprocessing, converters, bad input."""

import pytest
import torch
from helpers.blip_reference import BertModel, ImageRewardReference, VisionTransformer
from helpers.open_clip_reference import OpenCLIP

from distar.errors import UserError
from distar.rewards import KNOWN, AestheticReward, ClipReward, RewardSpec, WeightedReward, load_reward
from distar.rewards.convert import convert_hpsv2, open_clip_to_hf
from distar.rewards.image_reward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageReward, convert_image_reward
from distar.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_longest_pad, resize_shortest_center_crop
from distar.rewards.tiny import build_tiny_rewards

PROMPTS = ["a red cube on a blue sphere", "a watercolor painting of a fox"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return build_tiny_rewards(tmp_path_factory.mktemp("rewards"))


@pytest.fixture(scope="module")
def rewards(specs):
    return {name: load_reward(RewardSpec(**spec)) for name, spec in specs.items()}


def _images(seed=0, size=64):
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


# the lab's digits reward reads prompts that name a digit: tests/unit/test_lab_metrics.py holds it to the same
@pytest.mark.parametrize("name", [n for n in KNOWN if n != "digits"])
def test_every_reward_is_differentiable_in_the_image_and_frozen(rewards, name):
    reward = rewards[name]
    images = _images().requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    (grad,) = torch.autograd.grad(scores.sum(), images)
    assert grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())


def test_clip_rewards_follow_their_formulas(rewards):
    """Against transformers' own CLIPModel forward (logits_per_image = logit_scale.exp() · cos)."""
    images = _images(1)
    for name in ("pickscore", "hpsv2.1", "clip"):
        reward = rewards[name]
        pixels = reward.preprocess(images)
        ids = reward.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = reward.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
            cos = out.logits_per_image.diagonal() / reward.model.logit_scale.exp()
            expected = {"pickscore": out.logits_per_image.diagonal(), "hpsv2.1": cos, "clip": 100 * cos.clamp(min=0)}
            torch.testing.assert_close(reward(images, PROMPTS), expected[name], atol=1e-5, rtol=1e-5)


def test_aesthetic_is_the_head_on_normalised_image_embeddings(rewards):
    reward = rewards["aesthetic"]
    images = _images(2)
    with torch.no_grad():
        e = reward.vision(pixel_values=reward.preprocess(images)).image_embeds
        expected = reward.head.layers(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)
        torch.testing.assert_close(reward(images, PROMPTS), expected)


def test_weighted_reward_sums_its_terms(specs, rewards):
    combo = WeightedReward.from_specs(
        [RewardSpec(weight=0.5, **specs["pickscore"]), RewardSpec(weight=2.0, **specs["aesthetic"])]
    )
    images = _images(3)
    with torch.no_grad():
        # each term on the paper's scale: PickScore's raw logit_scale·cos / 100, the aesthetic score raw
        expected = 0.5 * 0.01 * rewards["pickscore"](images, PROMPTS) + 2.0 * rewards["aesthetic"](images, PROMPTS)
        torch.testing.assert_close(combo(images, PROMPTS), expected)
        assert set(combo.terms(images, PROMPTS)) == {"pickscore", "aesthetic"}


def test_clip_preprocessing_matches_the_pil_image_processor():
    """Our differentiable resize + crop + normalise against transformers' CLIPImageProcessor (PIL backend)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # A smooth image (natural images are mostly low-frequency); white noise would test aliasing, not the recipe.
    coarse = torch.rand(1, 3, 6, 8, generator=torch.Generator().manual_seed(4))
    img = (torch.nn.functional.interpolate(coarse, size=(48, 64), mode="bilinear")[0] * 255).round() / 255
    pil = Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy())
    theirs = torch.as_tensor(proc(images=pil, return_tensors="np").pixel_values)
    ours = normalize(resize_shortest_center_crop(img[None], 32), CLIP_MEAN, CLIP_STD)
    assert ours.shape == theirs.shape == (1, 3, 32, 32)
    # PIL resamples in uint8; the mean difference is a fraction of one grey level (1/255/0.27 ≈ 0.015).
    assert (ours - theirs).abs().mean() < 0.02
    # Without resizing only normalisation remains: exact.
    exact = torch.as_tensor(proc(images=pil.crop((16, 8, 48, 40)), return_tensors="np").pixel_values)
    torch.testing.assert_close(normalize(img[None, :, 8:40, 16:48], CLIP_MEAN, CLIP_STD), exact, atol=1e-5, rtol=0)


def test_hps_resize_longest_side_and_pad_centred_with_zeros():
    img = torch.rand(1, 3, 32, 64) + 0.5
    out = resize_longest_pad(img, 32)
    assert out.shape == (1, 3, 32, 32)
    assert out[..., :8, :].abs().sum() == 0 and out[..., 24:, :].abs().sum() == 0
    assert (out[..., 8:24, :] > 0).all()


def _open_clip_and_converted():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    ref = OpenCLIP(
        embed_dim=16,
        image_size=32,
        patch_size=8,
        vision_width=32,
        vision_layers=2,
        vision_heads=4,
        vocab_size=100,
        context_length=77,
        text_width=24,
        text_layers=2,
        text_heads=4,
    ).eval()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=24,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=98,
            eos_token_id=99,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=16,
    )
    return ref, config, CLIPModel


def test_open_clip_converter_computes_the_same_function(tmp_path):
    ref, config, CLIPModel = _open_clip_and_converted()
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, ckpt)
    model = CLIPModel.from_pretrained(convert_hpsv2(ckpt, tmp_path / "hps", config=config)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    text = torch.zeros(3, 77, dtype=torch.long)
    for i, n in enumerate((5, 9, 20)):  # bos, tokens, eos (the largest id), zero padding: open_clip's layout
        text[i, 0] = 98
        text[i, 1:n] = torch.randint(1, 98, (n - 1,))
        text[i, n] = 99
    with torch.no_grad():
        img_hf = model.get_image_features(pixel_values=pixels).pooler_output
        txt_hf = model.get_text_features(input_ids=text).pooler_output
        torch.testing.assert_close(
            img_hf / img_hf.norm(dim=-1, keepdim=True), ref.encode_image(pixels), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(
            txt_hf / txt_hf.norm(dim=-1, keepdim=True), ref.encode_text(text), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(model.logit_scale, ref.logit_scale)


def test_converter_rejects_other_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not an open_clip CLIP state dict"):
        open_clip_to_hf({"weight": torch.zeros(1)})
    ckpt = tmp_path / "garbage.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read the HPSv2 checkpoint"):
        convert_hpsv2(ckpt, tmp_path / "out")


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.rand(2, 3, 16, 16), ["one"], "^prompts must be a list of one prompt per image: 2 images but 1 prompts"),
        (torch.rand(2, 3, 16, 16), "a cat", "^prompts must be a list"),
        (torch.rand(2, 3, 16, 16) * 2 - 1, PROMPTS, r"^images must lie in \[0, 1\]"),
        (torch.rand(2, 4, 16, 16), PROMPTS, r"^images must have shape \(B, 3, H, W\)"),
        (torch.rand(2, 16, 16), PROMPTS, r"^images must have shape"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), PROMPTS, "^images must be a float tensor"),
    ],
)
def test_bad_images_and_prompts_name_the_argument(rewards, images, prompts, match):
    for reward in (rewards["pickscore"], rewards["aesthetic"], rewards["imagereward"]):
        with pytest.raises(ValueError, match=match):
            reward(images, prompts)


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(
        UserError,
        match="unknown reward 'pixscore'; known rewards: pickscore, hpsv2.1, clip, aesthetic, imagereward, digits$",
    ):
        load_reward(RewardSpec("pixscore"))


def test_missing_reward_files_are_listed(specs, tmp_path):
    import shutil

    broken = tmp_path / "pick"
    shutil.copytree(specs["pickscore"]["source"], broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.json").unlink()
    with pytest.raises(UserError, match="missing 1 file"):
        ClipReward.from_pretrained("pickscore", broken)
    with pytest.raises(UserError, match="is not a LAION aesthetic predictor head"):
        AestheticReward.from_pretrained(
            specs["aesthetic"]["source"], specs["pickscore"]["source"] + "/model.safetensors"
        )


def test_image_reward_converter_computes_the_same_function(specs, tmp_path):
    from transformers import BlipTextConfig, BlipVisionConfig

    torch.manual_seed(0)
    tokenizer_dir = specs["imagereward"]["source"] + "/tokenizer"
    vocab = 91  # the tiny BERT tokenizer's size, [DEC] and [ENC] included
    ref = ImageRewardReference(
        VisionTransformer(32, 8, 32, 2, 4), BertModel(vocab, 24, 2, 4, 48, 32), IMAGEREWARD_MEAN, IMAGEREWARD_STD
    ).eval()
    torch.save(ref.state_dict(), tmp_path / "ImageReward.pt")
    configs = (
        BlipVisionConfig(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
        ),
        BlipTextConfig(
            vocab_size=vocab,
            hidden_size=24,
            encoder_hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            is_decoder=True,
            hidden_act="gelu",
        ),
    )
    out = convert_image_reward(
        tmp_path / "ImageReward.pt", tmp_path / "ir", tokenizer_source=tokenizer_dir, configs=configs
    )
    reward = ImageReward.from_pretrained(out)
    assert len(reward.tokenizer) == vocab
    images = _images(5)
    ids = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ids.attention_mask[0].sum() < 35  # padding is present, so the attention mask is exercised
    with torch.no_grad():
        expected = ref.score(ids.input_ids, ids.attention_mask, reward.preprocess(images))
        torch.testing.assert_close(reward(images, PROMPTS), expected, atol=1e-5, rtol=1e-4)


def test_image_reward_converter_rejects_other_checkpoints(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not an ImageReward state dict"):
        convert_image_reward(tmp_path / "x.pt", tmp_path / "out")


def test_the_reward_term_of_l_g_has_the_papers_weight(specs, rewards):
    """∂(−α_rew · r)/∂images = −α_rew · w · PAPER_SCALE · ∂raw/∂images: α_rew = 100 with pickscore = 1 is exactly
    100 × the cosine, the paper's setting; the sdxl preset trains on it."""
    from distar.backbones.sdxl import schedule as sdxl_schedule
    from distar.losses import generator_objective
    from distar.rewards import PAPER_SCALE
    from distar.train.config import load_config

    alpha, w = 100.0, 0.7
    combo = WeightedReward.from_specs([RewardSpec(weight=w, **specs["pickscore"])])
    images = _images(2).requires_grad_(True)
    r = combo.combine(combo.terms(images, PROMPTS))
    zeros = torch.zeros(2, 4)

    def eps(x_t, t):
        return torch.zeros_like(x_t)

    loss = generator_objective(
        zeros, torch.tensor([100, 200]), zeros, eps, eps, sdxl_schedule(), reward=r, alpha_rew=alpha
    )
    (got,) = torch.autograd.grad(loss.reward_loss, images)
    raw = rewards["pickscore"](images, PROMPTS).mean()
    (want,) = torch.autograd.grad(raw, images)
    torch.testing.assert_close(got, -alpha * w * PAPER_SCALE["pickscore"] * want)
    sdxl = load_config("sdxl", ["data.prompts=x"])
    assert sdxl.loss.alpha_rew * sdxl.reward.weights["pickscore"] * PAPER_SCALE["pickscore"] == 1.0
