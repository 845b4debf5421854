"""Swin-3D layers: parity with torchvision's Video Swin layers and the laws of windows."""

import pytest
import torch

import fmm
from fmm.nn import AttentionConfig, TransformerConfig, attention, block, init_block
from fmm.nn.swin import (
    Window,
    init_patch_embed_3d,
    init_patch_merging,
    init_window_attention,
    patch_embed_3d,
    patch_merging,
    relative_position_index,
    window_attention,
)
from tests.reference import reference

CFG = AttentionConfig(dim=16, heads=2)


def _params(window, seed=0):
    return init_window_attention(CFG, window, fmm.random.key(seed))


def _x(*grid, seed=1, dim=16):
    return fmm.random.normal(fmm.random.key(seed), (2, *grid, dim))


def _torchvision_attention(params, window):
    tv = reference("torchvision.models.video.swin_transformer")
    layer = tv.ShiftedWindowAttention3d(CFG.dim, list(window.size), list(window.shift), CFG.heads)
    with torch.no_grad():
        layer.qkv.weight.copy_(params["qkv"]["weight"])
        layer.qkv.bias.copy_(params["qkv"]["bias"])
        layer.proj.weight.copy_(params["out"]["weight"])
        layer.proj.bias.copy_(params["out"]["bias"])
        layer.relative_position_bias_table.copy_(params["rel_bias"])
    return layer.eval()


@pytest.mark.parametrize(
    "size, shift, grid",
    [
        ((2, 4, 4), (0, 0, 0), (4, 8, 8)),  # whole windows
        ((2, 4, 4), (1, 2, 2), (4, 8, 8)),  # shifted, masked at the wrap
        ((2, 3, 3), (1, 1, 1), (3, 7, 5)),  # padded to whole windows
        ((8, 7, 7), (4, 3, 3), (1, 9, 9)),  # an image: the window shrinks to one frame
        ((2, 4, 4), (1, 2, 2), (1, 2, 3)),  # smaller than a window everywhere
    ],
)
def test_window_attention_matches_torchvision(size, shift, grid):
    window = Window(size=size, shift=shift)
    params = _params(window)
    x = _x(*grid)
    ours = window_attention(params, x, cfg=CFG, window=window)
    with torch.no_grad():
        theirs = _torchvision_attention(params, window)(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_relative_position_index_matches_torchvision():
    tv = reference("torchvision.models.video.swin_transformer")
    layer = tv.ShiftedWindowAttention3d(8, [2, 3, 4], [0, 0, 0], 2)
    assert torch.equal(relative_position_index((2, 3, 4)), layer.relative_position_index)


def test_one_window_over_the_input_is_full_attention():
    # The law: with one window covering the grid (and no shift), window attention is plain
    # attention over the flattened grid with the relative bias as an additive score bias.
    window = Window(size=(2, 4, 4), shift=(1, 2, 2))
    params = _params(window)
    x = _x(2, 4, 4)
    ours = window_attention(params, x, cfg=CFG, window=window)
    flat = x.flatten(1, 3)
    idx = relative_position_index((2, 4, 4))
    bias = params["rel_bias"][idx].permute(2, 0, 1)[None]
    full = attention(params, flat, cfg=CFG, bias=bias).view_as(x)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)
    # with a zero table it is attention with no bias at all
    params["rel_bias"] = torch.zeros_like(params["rel_bias"])
    plain = attention(params, flat, cfg=CFG).view_as(x)
    torch.testing.assert_close(window_attention(params, x, cfg=CFG, window=window), plain)


def test_unshifted_windows_commute_with_rolls_by_whole_windows():
    window = Window(size=(2, 2, 2))
    params = _params(window)
    x = _x(4, 4, 6)
    shifts, dims = (2, 2, 4), (1, 2, 3)
    rolled = window_attention(params, torch.roll(x, shifts, dims), cfg=CFG, window=window)
    expect = torch.roll(window_attention(params, x, cfg=CFG, window=window), shifts, dims)
    torch.testing.assert_close(rolled, expect, atol=1e-5, rtol=1e-5)


def test_shifted_windows_are_the_plain_windows_of_the_rolled_grid_away_from_the_wrap():
    # Shifting the windows by k is rolling the grid by -k under plain windows, except at the
    # wrapped-around pieces, which the mask keeps apart: in the grid's interior (windows
    # that no wrap touches) both agree.
    size, shift = (2, 2, 2), (1, 1, 1)
    params = _params(Window(size=size, shift=shift))
    x = _x(4, 6, 6)
    shifted = window_attention(params, x, cfg=CFG, window=Window(size=size, shift=shift))
    rolled = torch.roll(x, (-1, -1, -1), (1, 2, 3))
    plain = window_attention(params, rolled, cfg=CFG, window=Window(size=size))
    plain = torch.roll(plain, (1, 1, 1), (1, 2, 3))
    inner = (slice(None), slice(1, 3), slice(1, 5), slice(1, 5))
    torch.testing.assert_close(shifted[inner], plain[inner], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shifted[:, 0], plain[:, 0], atol=1e-3)


def test_a_token_sees_only_its_window():
    window = Window(size=(1, 2, 2))
    params = _params(window)
    x = _x(2, 4, 4)
    y = window_attention(params, x, cfg=CFG, window=window)
    x2 = x.clone()
    x2[:, 0, 0, 0] += 1.0  # inside the window at (0, 0:2, 0:2)
    y2 = window_attention(params, x2, cfg=CFG, window=window)
    changed = (y2 - y).abs().amax(dim=(0, -1)) > 0
    expect = torch.zeros(2, 4, 4, dtype=torch.bool)
    expect[0, :2, :2] = True
    assert torch.equal(changed, expect)


def test_swin_block_is_the_transformer_block_with_windows():
    tv = reference("torchvision.models.swin_transformer")
    swin3d = reference("torchvision.models.video.swin_transformer")
    cfg = TransformerConfig(width=16, layers=1, heads=2)
    window = Window(size=(2, 4, 4), shift=(1, 2, 2))
    params = init_block(cfg, fmm.random.key(0))
    params["attn"] = _params(window)
    ref = tv.SwinTransformerBlock(
        16, 2, [2, 4, 4], [1, 2, 2], attn_layer=swin3d.ShiftedWindowAttention3d
    ).eval()
    ref.attn.load_state_dict(_torchvision_attention(params["attn"], window).state_dict())
    with torch.no_grad():
        for ours, theirs in (("fc1", ref.mlp[0]), ("fc2", ref.mlp[3])):
            theirs.weight.copy_(params["mlp"][ours]["weight"])
            theirs.bias.copy_(params["mlp"][ours]["bias"])
        x = _x(2, 8, 8)
        torch.testing.assert_close(
            block(params, x, cfg=cfg, window=window), ref(x), atol=1e-5, rtol=1e-5
        )


def test_patch_embedding_and_merging_match_torchvision():
    tv = reference("torchvision.models.video.swin_transformer")
    embed = tv.PatchEmbed3d([2, 4, 4], in_channels=3, embed_dim=8)
    merge = tv.PatchMerging(8)
    p_embed = init_patch_embed_3d((2, 4, 4), 3, 8, fmm.random.key(0))
    p_merge = init_patch_merging(8, fmm.random.key(1))
    p_merge["norm"]["weight"] = torch.rand(32) + 0.5
    with torch.no_grad():
        embed.proj.weight.copy_(p_embed["weight"])
        embed.proj.bias.copy_(p_embed["bias"] + 0.1)
        p_embed["bias"] = p_embed["bias"] + 0.1
        merge.reduction.weight.copy_(p_merge["reduction"]["weight"])
        merge.norm.weight.copy_(p_merge["norm"]["weight"])
        video = torch.rand(2, 3, 3, 18, 22)  # not multiples of the patch: padded
        ours = patch_embed_3d(p_embed, video)
        torch.testing.assert_close(ours, embed(video), atol=1e-5, rtol=1e-5)
        assert ours.shape == (2, 2, 5, 6, 8)
        torch.testing.assert_close(patch_merging(p_merge, ours), merge(ours), atol=1e-5, rtol=1e-5)
        assert patch_merging(p_merge, ours).shape == (2, 2, 3, 3, 16)


def test_bad_windows_are_refused_by_name():
    with pytest.raises(ValueError, match="shift"):
        Window(size=(2, 2, 2), shift=(2, 0, 0))
    with pytest.raises(ValueError, match="size"):
        Window(size=(2, 2))


def test_an_additive_bias_is_the_same_on_both_attention_paths():
    params = _params(Window(size=(1, 1, 1)))
    x = fmm.random.normal(fmm.random.key(3), (2, 6, 16))
    bias = fmm.random.normal(fmm.random.key(4), (1, 2, 6, 6))
    mask = torch.ones(6, 6, dtype=torch.bool).triu()
    math_cfg = AttentionConfig(dim=16, heads=2, impl="math")
    for kwargs in ({"bias": bias}, {"bias": bias, "mask": mask}, {"bias": bias, "causal": True}):
        torch.testing.assert_close(
            attention(params, x, cfg=CFG, **kwargs),
            attention(params, x, cfg=math_cfg, **kwargs),
            atol=1e-5,
            rtol=1e-5,
        )
