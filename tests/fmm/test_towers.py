"""fmm.nn.towers: the shared ViT and text towers, as laws on small odd sizes."""

import pytest
import torch

import fmm
from fmm.nn import TransformerConfig, towers

STACK = TransformerConfig(width=12, layers=2, heads=3, mlp_dim=20)
VIT = towers.ViTConfig(image_size=10, patch_size=5, transformer=STACK, mask_token=True)
TEXT = towers.TextConfig(vocab_size=13, context_length=7, transformer=STACK, causal=True)


def _images(b=3):
    return fmm.random.uniform(fmm.random.key(1), (b, 3, 10, 10))


def _ids(b=3, s=7):
    return (fmm.random.uniform(fmm.random.key(2), (b, s)) * 13).long()


def test_vit_keeps_the_class_token_first_and_masks_patches_with_the_mask_token():
    params = towers.init_vit(VIT, fmm.random.key(0))
    out = towers.vit(params, _images(), cfg=VIT)
    assert out.sequence.shape == out.hidden.shape == (3, VIT.seq, 12)
    assert params["transformer"]["blocks"][0]["mlp"]["fc1"]["weight"].shape == (20, 12)
    everything = torch.ones(3, VIT.grid**2, dtype=torch.bool)
    # Every patch masked: the images no longer matter, only the mask token does.
    a = towers.vit(params, _images(), cfg=VIT, patch_mask=everything)
    b = towers.vit(params, torch.zeros(3, 3, 10, 10), cfg=VIT, patch_mask=everything)
    torch.testing.assert_close(a.sequence, b.sequence)


def test_a_causal_text_tower_reads_no_later_token():
    params = towers.init_text(TEXT, fmm.random.key(0))
    ids = _ids()
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 13
    a, b = towers.text(params, ids, cfg=TEXT), towers.text(params, changed, cfg=TEXT)
    torch.testing.assert_close(a.sequence[:, :4], b.sequence[:, :4])
    assert not torch.allclose(a.sequence[:, 4:], b.sequence[:, 4:])


def test_encode_embeddings_is_the_tower_after_its_embeddings_and_runs_every_block():
    params = towers.init_text(TEXT, fmm.random.key(0))
    ids = _ids()
    ran = []

    def counting_block(block_params, x, **kwargs):
        ran.append(block_params)
        return fmm.nn.block(block_params, x, **kwargs)

    x = fmm.nn.embed(params["token"], ids) + params["pos"]
    got = towers.encode_embeddings(params, x, cfg=TEXT, causal=True, block_fn=counting_block)
    want = towers.text(params, ids, cfg=TEXT)
    torch.testing.assert_close(got.sequence, want.sequence)
    assert [id(b) for b in ran] == [id(b) for b in params["transformer"]["blocks"]]


def test_embedding_dropout_draws_from_the_key_and_needs_one():
    cfg = towers.TextConfig(vocab_size=13, context_length=7, transformer=STACK, dropout=0.5)
    params = towers.init_text(cfg, fmm.random.key(0))
    ids = _ids()
    with pytest.raises(ValueError, match="key= is missing"):
        towers.text(params, ids, cfg=cfg, train=True)
    a = towers.text(params, ids, cfg=cfg, train=True, key=fmm.random.key(5))
    b = towers.text(params, ids, cfg=cfg, train=True, key=fmm.random.key(5))
    c = towers.text(params, ids, cfg=cfg, train=True, key=fmm.random.key(6))
    torch.testing.assert_close(a.sequence, b.sequence)
    assert not torch.allclose(a.sequence, c.sequence)
    torch.testing.assert_close(
        towers.text(params, ids, cfg=cfg).sequence,
        towers.text(params, ids, cfg=cfg, key=fmm.random.key(5)).sequence,
    )
