"""3-d convs with VideoGPT's SAME padding, axial attention and batch norm: shape laws and
parity with TorchMultimodal's SamePadConv3d / SamePadConvTranspose3d / AxialAttentionBlock."""

import math

import pytest
import torch
from torch import nn

import fmm
from fmm.nn import norm
from fmm.nn.axial import axial_attention, init_axial_attention
from fmm.nn.conv3d import conv3d, conv_transpose3d, init_conv3d, init_conv_transpose3d
from tests.reference import reference

tmm_conv = reference("torchmultimodal.modules.layers.conv")
tmm_vqvae = reference("torchmultimodal.models.video_gpt.video_vqvae")

CASES = [  # kernel, stride, (T, H, W)
    ((4, 4, 4), (2, 2, 2), (8, 16, 16)),
    ((3, 3, 3), (1, 1, 1), (5, 7, 9)),
    ((3, 4, 4), (1, 2, 2), (4, 10, 12)),
    ((2, 3, 5), (2, 1, 3), (7, 6, 11)),
]


@pytest.mark.parametrize("kernel, stride, size", CASES)
def test_conv3d_same_matches_reference_and_shape_law(kernel, stride, size):
    ref = tmm_conv.SamePadConv3d(3, 5, kernel, stride)
    params = {"weight": ref.conv.weight.detach(), "bias": ref.conv.bias.detach()}
    x = torch.randn(2, 3, *size)
    y = conv3d(params, x, stride=stride)
    assert y.shape[2:] == tuple(math.ceil(d / s) for d, s in zip(size, stride))
    torch.testing.assert_close(y, ref(x).detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel, stride, size", CASES)
def test_conv_transpose3d_same_matches_reference_and_shape_law(kernel, stride, size):
    ref = tmm_conv.SamePadConvTranspose3d(3, 4, kernel, stride)
    params = {"weight": ref.convt.weight.detach(), "bias": ref.convt.bias.detach()}
    x = torch.randn(2, 3, *size)
    y = conv_transpose3d(params, x, stride=stride)
    assert y.shape[2:] == tuple(d * s for d, s in zip(size, stride))
    torch.testing.assert_close(y, ref(x).detach(), atol=1e-5, rtol=0)


def test_init_layouts_and_explicit_padding():
    p = init_conv3d(3, 8, (1, 3, 3), fmm.random.key(0))
    assert p["weight"].shape == (8, 3, 1, 3, 3) and p["bias"].shape == (8,)
    q = init_conv_transpose3d(8, 3, 4, fmm.random.key(1), bias=False)
    assert q["weight"].shape == (8, 3, 4, 4, 4) and "bias" not in q
    x = torch.randn(1, 3, 4, 6, 6)
    ref = nn.functional.conv3d(x, p["weight"], p["bias"], padding=(0, 1, 1))
    torch.testing.assert_close(conv3d(p, x, padding=(0, 1, 1)), ref)


def test_conv3d_bad_input_names_the_argument():
    p = init_conv3d(3, 8, 3, fmm.random.key(0))
    with pytest.raises(ValueError, match="x must be"):
        conv3d(p, torch.randn(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="stride"):
        conv3d(p, torch.randn(1, 3, 2, 2, 2), stride=0)
    with pytest.raises(ValueError, match="padding"):
        conv3d(p, torch.randn(1, 3, 2, 2, 2), padding="valid")


def test_axial_attention_matches_reference_block():
    torch.manual_seed(0)
    ref = tmm_vqvae.AxialAttentionBlock(3, 8, 2)
    params = {"axes": []}
    for mha in ref.mha_attns:
        qkv = torch.cat([mha.query.weight, mha.key.weight, mha.value.weight]).detach()
        out = {"weight": mha.output.weight.detach(), "bias": mha.output.bias.detach()}
        params["axes"].append({"qkv": {"weight": qkv}, "out": out})
    x = torch.randn(2, 8, 3, 4, 5)  # [B, C, T, H, W]
    want = ref(x).detach()
    got = axial_attention(params, x.permute(0, 2, 3, 4, 1), heads=2).permute(0, 4, 1, 2, 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_axial_attention_on_one_axis_is_full_attention():
    # With a single grid axis, axial attention is plain self-attention over that axis.
    p = init_axial_attention(8, 1, fmm.random.key(0))
    x = torch.randn(2, 6, 8)
    cfg = fmm.nn.AttentionConfig(dim=8, heads=2)
    torch.testing.assert_close(axial_attention(p, x, heads=2), fmm.nn.attention(p["axes"][0], x, cfg=cfg))  # fmt: skip


def test_batch_norm_matches_torch_train_and_eval():
    bn = nn.BatchNorm3d(4)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    params = {
        k: v.detach().clone() for k, v in bn.state_dict().items() if k != "num_batches_tracked"
    }
    x = torch.randn(3, 4, 2, 3, 3) * 2 + 1
    torch.testing.assert_close(norm.batch_norm(params, x, train=True), bn.train()(x).detach())
    # nn.BatchNorm moved its running statistics in that call; ours moves by update_running_stats.
    mean, var = norm.batch_statistics(x)
    new = norm.update_running_stats(params, mean, var, momentum=0.1)
    torch.testing.assert_close(new["running_mean"], bn.running_mean)
    torch.testing.assert_close(new["running_var"], bn.running_var)
    torch.testing.assert_close(norm.batch_norm(new, x, train=False), bn.eval()(x).detach())
