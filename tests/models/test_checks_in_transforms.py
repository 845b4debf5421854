"""The boundary checks do not get in the way of what the functions are for: transforms
(``grad``, ``vmap``), ``torch.compile``, meta params, int8, dispatch modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fmm
from fmm import decoding, quant
from models import clip, gpt
from tests.models.bad_input_world import CLIP, GPT, OTHER, B, meta_params, random_params, world


def test_params_of_another_preset_name_both_shapes_and_the_expected_preset():
    other = OTHER["clip"]()
    with pytest.raises(ValueError) as info:
        clip.encode_text(other, world()["clip_tokens"], cfg=CLIP)
    message = str(info.value)
    assert message.startswith("params do not fit clip_tiny (CLIPConfig)")
    assert "text.token.weight is [49408, 512], expected [64, 128]" in message
    assert "image." not in message  # encode_text reads only the text tower


def test_value_checks_see_through_vmap_and_grad():
    params, tokens = world()["clip"], world()["clip_tokens"]
    per_row = torch.func.vmap(lambda t: clip.encode_text(params, t[None], cfg=CLIP)[0])
    torch.testing.assert_close(per_row(tokens), clip.encode_text(params, tokens, cfg=CLIP))
    bad = tokens.clone()
    bad[1, 2] = CLIP.vocab_size  # one example of the batch is out of range
    with pytest.raises(ValueError, match=r"^tokens must lie in \[0, 64\), got values in"):
        per_row(bad)
    grads = torch.func.grad(lambda p: clip.encode_text(p, tokens, cfg=CLIP).sum())(params)
    assert grads["text"]["token"]["weight"].shape == (CLIP.vocab_size, CLIP.text_width)
    with pytest.raises(ValueError, match=r"^tokens must lie"):
        torch.func.grad(lambda p: clip.encode_text(p, bad, cfg=CLIP).sum())(params)


def test_checked_functions_compile_as_one_graph_without_recompiling():
    params, images, tokens = world()["clip"], world()["images32"], world()["clip_tokens"]
    f = torch.compile(clip.apply, fullgraph=True, backend="eager")
    for got, want in zip(
        f(params, images, tokens, cfg=CLIP), clip.apply(params, images, tokens, cfg=CLIP)
    ):
        torch.testing.assert_close(got, want)
    with torch._dynamo.config.patch(error_on_recompile=True):
        f(params, images + 0.5, (tokens + 1) % CLIP.vocab_size, cfg=CLIP)


def test_meta_and_quantized_params_pass_the_param_check():
    meta = meta_params(clip.init, CLIP)
    out = clip.encode_image(meta, torch.empty(B, 3, 32, 32, device="meta"), cfg=CLIP)
    assert out.device.type == "meta" and out.shape == (B, CLIP.embed_dim)
    ids = torch.empty(B, 7, dtype=torch.int64, device="meta")  # no values: the range check skips
    assert clip.encode_text(meta, ids, cfg=CLIP).shape == (B, CLIP.embed_dim)
    q = quant.quantize(world()["gpt"])
    assert gpt.apply(q, world()["gpt_tokens"], cfg=GPT).shape == (B, 9, GPT.vocab_size)


def test_a_decoder_spec_without_init_still_checks_the_blocks():
    spec = dataclasses.replace(GPT.decoder_spec, init=None, config=None)
    params = world()["gpt"]
    short = {**params, "transformer": {"blocks": params["transformer"]["blocks"][:1]}}
    with pytest.raises(ValueError, match=r"^params have 1 transformer blocks .* layers=2"):
        decoding.generate(short, world()["gpt_tokens"], cfg=spec, max_new_tokens=1)
    narrow = random_params(gpt.init, GPT)  # a copy of its own, to edit
    narrow["transformer"]["blocks"][1]["mlp"]["fc1"]["weight"] = torch.zeros(3, GPT.width)
    with pytest.raises(
        ValueError, match=r"^params' block 1 do not fit .*mlp\.fc1\.weight is \[3, 64\]"
    ):
        decoding.generate(narrow, world()["gpt_tokens"], cfg=spec, max_new_tokens=1)


def test_the_first_check_of_a_config_may_run_inside_a_transform_or_a_mode():
    # Each config is new to the checks' cache, so its expected shapes are built right here,
    # inside grad, vmap or a dispatch mode (which must not see that build's ops).
    tokens = world()["gpt_tokens"]
    fresh = [dataclasses.replace(GPT, width=8 * (i + 2), heads=2, layers=1) for i in range(3)]
    params = [gpt.init(cfg, fmm.random.key(i)) for i, cfg in enumerate(fresh)]
    grads = torch.func.grad(lambda p: gpt.apply(p, tokens, cfg=fresh[0]).sum())(params[0])
    assert grads["token"]["weight"].shape == params[0]["token"]["weight"].shape
    rows = torch.func.vmap(lambda t: gpt.apply(params[1], t[None], cfg=fresh[1])[0])(tokens)
    assert rows.shape == (B, 9, GPT.vocab_size)
    counts = []
    for _ in range(2):  # the first call builds the expected shapes, the second does not
        with _CountOps() as counter:
            gpt.apply(params[2], tokens, cfg=fresh[2])
        counts.append(counter.ops)
    assert counts[0] == counts[1] > 0


class _CountOps(TorchDispatchMode):
    """Counts the ops a call dispatches (as a profiler or a FLOP counter would see them)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
