"""The flow families' prompt encoders: offloaded between encodes (model.text_encoder_offload) and caching."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import tiny

from distar import backbones
from distar.train.networks import OffloadedPromptEncoder


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_offloaded_encoder_encodes_as_the_resident_one_and_keeps_its_host_weights(family):
    """Its conditioning equals the resident encoder's; while a batch is encoded the encoders compute with device
    copies of their weights (here the device is this CPU, so the copies lie beside the host tensors), and after
    each encode every weight is again the host tensor it was: the copy is dropped, nothing is copied back."""
    encoder = backbones.get(family).prompt_encoder(tiny(f"tiny:{family}"))
    prompts = ["a red cube on a table", "a fox"]
    resident = encoder.encode(prompts, 16, 16)
    offloaded = OffloadedPromptEncoder(encoder, "cpu")
    host = [t.data_ptr() for t in offloaded.host]
    assert len(host) == len(list(encoder.parameters())) + len(list(encoder.buffers())) > 10
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append([p.data_ptr() for p in m.parameters()]))
             for m in encoder.encoders]  # fmt: skip
    for _ in range(2):
        out = offloaded.encode(prompts, 16, 16)
        assert [t.data_ptr() for t in offloaded.host] == host
    for h in hooks:
        h.remove()
    assert seen and all(ptr not in host for ptrs in seen for ptr in ptrs)
    assert torch.equal(out.prompt_embeds, resident.prompt_embeds)
    assert torch.equal(out.pooled_prompt_embeds, resident.pooled_prompt_embeds)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_caching_encoder_encodes_each_prompt_once_and_returns_the_same_rows(family):
    """cache=True (as SDXL's encoder takes it): the rows of a repeated or reordered batch equal a fresh encode, and
    each distinct prompt is held once."""
    uncached = backbones.get(family).prompt_encoder(tiny(f"tiny:{family}"))
    cached = backbones.get(family).prompt_encoder(tiny(f"tiny:{family}"), cache=True)
    prompts = ["a fox", "a red cube on a table", "a red cube on a table"]
    want = uncached.encode(prompts, 16, 16)
    first = cached.encode(prompts[::-1], 16, 16)
    again = cached.encode(prompts, 16, 16)
    assert len(cached._cache) == 2
    for got, order in ((first, [2, 1, 0]), (again, [0, 1, 2])):
        torch.testing.assert_close(got.prompt_embeds, want.prompt_embeds[order])
        torch.testing.assert_close(got.pooled_prompt_embeds, want.pooled_prompt_embeds[order])
