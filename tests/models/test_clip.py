"""CLIP: published sizes, laws and clear errors at the boundary."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, vmap

import fmm
import models
from models import clip

SMALL = dataclasses.replace(
    clip.clip_tiny(vocab_size=11, context_length=7),
    image_size=12,
    patch_size=4,
    image_width=10,
    image_layers=2,
    image_heads=2,
    text_width=6,
    text_layers=2,
    text_heads=3,
    embed_dim=5,
)


@pytest.fixture(scope="module")
def params():
    return clip.init(SMALL, fmm.random.key(0))


def _images(seed, b, cfg=SMALL):
    return fmm.random.uniform(fmm.random.key(seed), (b, 3, cfg.image_size, cfg.image_size))


def _tokens(seed, b, t=7, cfg=SMALL):
    u = fmm.random.uniform(fmm.random.key(seed), (b, t))
    return (u * (cfg.vocab_size - 1)).long()


def test_vit_b16_has_the_reference_parameter_count():
    p = clip.init(clip.clip_vit_b16(), fmm.random.key(0).to("meta"))
    assert fmm.tree.count(p) - p["logit_scale"].numel() == 149_620_736


def test_published_dimensions():
    b16, b32, l14 = clip.clip_vit_b16(), clip.clip_vit_b32(), clip.clip_vit_l14()
    assert (b16.image_width, b16.image_layers, b16.image_heads, b16.patch_size, b16.image_size) == (
        768,
        12,
        12,
        16,
        224,
    )
    assert (
        b16.text_width,
        b16.text_layers,
        b16.text_heads,
        b16.context_length,
        b16.vocab_size,
    ) == (512, 12, 8, 77, 49408)
    assert b16.embed_dim == 512 and b16.act == "quick_gelu" and b32.patch_size == 32
    assert (l14.image_width, l14.image_layers, l14.patch_size, l14.embed_dim, l14.text_width) == (
        1024,
        24,
        14,
        768,
        768,
    )


def test_embeddings_have_unit_norm_and_shapes(params):
    img = clip.encode_image(params, _images(1, 3), cfg=SMALL)
    txt = clip.encode_text(params, _tokens(2, 3), cfg=SMALL)
    assert img.shape == txt.shape == (3, 5)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))


@given(b=st.integers(1, 4), seed=st.integers(0, 100))
def test_batch_independence_and_vmap_agreement(b, seed):
    p = clip.init(SMALL, fmm.random.key(0))
    images, tokens = _images(seed, b), _tokens(seed + 1, b)
    img, txt = clip.encode_image(p, images, cfg=SMALL), clip.encode_text(p, tokens, cfg=SMALL)
    for i in range(b):
        torch.testing.assert_close(img[i], clip.encode_image(p, images[i : i + 1], cfg=SMALL)[0])
        torch.testing.assert_close(txt[i], clip.encode_text(p, tokens[i : i + 1], cfg=SMALL)[0])
    torch.testing.assert_close(
        vmap(lambda x: clip.encode_image(p, x[None], cfg=SMALL)[0])(images), img
    )


def test_text_embedding_ignores_tokens_after_eot(params):
    tokens = torch.tensor([[1, 2, 10, 0, 0, 0, 0]])  # 10 is the largest id: the end token
    changed = tokens.clone()
    changed[0, 3:] = torch.tensor([3, 4, 5, 6])
    torch.testing.assert_close(
        clip.encode_text(params, tokens, cfg=SMALL), clip.encode_text(params, changed, cfg=SMALL)
    )


def test_math_attention_equals_sdpa(params):
    math_cfg = dataclasses.replace(SMALL, attn_impl="math")
    images, tokens = _images(5, 2), _tokens(6, 2)
    torch.testing.assert_close(
        clip.encode_image(params, images, cfg=math_cfg),
        clip.encode_image(params, images, cfg=SMALL),
    )
    torch.testing.assert_close(
        clip.encode_text(params, tokens, cfg=math_cfg), clip.encode_text(params, tokens, cfg=SMALL)
    )


def test_per_example_gradients_equal_a_loop(params):
    # float64 so the comparison measures the transform, not float32 summation order
    cfg = dataclasses.replace(SMALL, attn_impl="math")
    params = fmm.tree.cast(params, torch.float64)
    images, tokens = _images(7, 4).double(), _tokens(8, 4)
    other_img = clip.encode_image(params, images, cfg=cfg).detach()

    def loss_one(p, image, token):
        # one example's contribution: its text scored against every image in the batch
        txt = clip.encode_text(p, token[None], cfg=cfg)
        img = clip.encode_image(p, image[None], cfg=cfg)
        logits = p["logit_scale"].exp() * txt @ torch.cat([img, other_img[1:]]).T
        return torch.nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, images, tokens)
    for i in range(4):
        want = grad(loss_one)(params, images[i], tokens[i])
        for a, b in zip(fmm.tree.leaves(per_example), fmm.tree.leaves(want)):
            torch.testing.assert_close(a[i], b, atol=1e-5, rtol=1e-5)


def test_loss_returns_metrics(params):
    value, metrics = clip.loss(
        params, {"images": _images(1, 3), "tokens": _tokens(2, 3)}, cfg=SMALL
    )
    assert value.ndim == 0 and torch.isfinite(value)
    torch.testing.assert_close(metrics["logit_scale"], params["logit_scale"].exp())


@pytest.mark.parametrize(
    ("images", "error", "pattern"),
    [
        (
            torch.rand(2, 1, 12, 12),
            ValueError,
            r"images must have shape \[batch, 3, 12, 12\], got \[2, 1, 12, 12\]",
        ),
        (torch.rand(2, 3, 16, 16), ValueError, r"got \[2, 3, 16, 16\]"),
        (torch.rand(3, 12, 12), ValueError, r"got \[3, 12, 12\]"),
        (torch.zeros(2, 3, 12, 12, dtype=torch.long), TypeError, "floating-point"),
    ],
)
def test_bad_images_name_the_argument_and_shapes(params, images, error, pattern):
    with pytest.raises(error, match=pattern):
        clip.encode_image(params, images, cfg=SMALL)


def test_bad_tokens_name_the_argument_and_shapes(params):
    with pytest.raises(
        ValueError,
        match=r"tokens must have shape \[batch, 1\.\.7\] \(context_length=7\), got \[2, 9\]",
    ):
        clip.encode_text(params, torch.zeros(2, 9, dtype=torch.long), cfg=SMALL)
    with pytest.raises(TypeError, match=r"tokens must be an integer tensor \(int64 or int32\)"):
        clip.encode_text(params, torch.zeros(2, 5), cfg=SMALL)
    with pytest.raises(
        ValueError, match=r"same batch size, got images \[2, 3, 12, 12\] and tokens \[3, 7\]"
    ):
        clip.apply(params, _images(0, 2), _tokens(0, 3), cfg=SMALL)


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match=r"unknown model preset 'clip_vit_b17'.*clip_vit_b16"):
        models.get_config("clip_vit_b17")
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(SMALL, image_size=13)


def test_example_losses_average_to_the_batch_loss(params):
    batch = {"images": _images(3, 4), "tokens": _tokens(4, 4)}
    bank = clip.detached_embeddings(params, batch, cfg=SMALL)
    terms = vmap(lambda i, t, k: clip.example_loss(params, i, t, k, *bank, cfg=SMALL))(
        batch["images"], batch["tokens"], torch.arange(4)
    )
    torch.testing.assert_close(terms.mean(), clip.loss(params, batch, cfg=SMALL)[0])
