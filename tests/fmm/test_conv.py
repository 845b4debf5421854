"""fmm.nn.conv: parity with torch.nn's conv modules on identical weights, and bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm.nn import conv


@given(
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 7),
    kernel=st.sampled_from([1, 3, 4]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.integers(5, 9),
)
def test_conv2d_equals_nn_conv2d_on_the_same_weights(c_in, c_out, kernel, stride, padding, size):
    p = conv.init_conv2d(c_in, c_out, kernel, fmm.random.key(c_in * 7 + c_out))
    p["bias"] = fmm.random.normal(fmm.random.key(1), (c_out,))
    ref = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding)
    ref.load_state_dict(p)  # same names and layout as nn.Conv2d
    x = fmm.random.normal(fmm.random.key(2), (3, c_in, size, size))
    torch.testing.assert_close(
        conv.conv2d(p, x, stride=stride, padding=padding), ref(x), rtol=1e-5, atol=1e-5
    )


@given(
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 7),
    kernel=st.sampled_from([2, 3, 4]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.integers(3, 7),
)
def test_conv_transpose2d_equals_nn_conv_transpose2d(c_in, c_out, kernel, stride, padding, size):
    p = conv.init_conv_transpose2d(c_in, c_out, kernel, fmm.random.key(c_in * 5 + c_out))
    p["bias"] = fmm.random.normal(fmm.random.key(3), (c_out,))
    ref = torch.nn.ConvTranspose2d(c_in, c_out, kernel, stride=stride, padding=padding)
    ref.load_state_dict(p)
    x = fmm.random.normal(fmm.random.key(4), (2, c_in, size, size))
    torch.testing.assert_close(
        conv.conv_transpose2d(p, x, stride=stride, padding=padding), ref(x), rtol=1e-5, atol=1e-5
    )


def test_kernel4_stride2_transpose_doubles_what_conv_halves():
    down = conv.init_conv2d(3, 5, 4, fmm.random.key(0))
    up = conv.init_conv_transpose2d(5, 3, 4, fmm.random.key(1))
    x = torch.rand(2, 3, 12, 12)
    h = conv.conv2d(down, x, stride=2, padding=1)
    assert h.shape == (2, 5, 6, 6)
    assert conv.conv_transpose2d(up, h, stride=2, padding=1).shape == x.shape


def test_res_block_is_x_plus_its_branch():
    p = conv.init_res_block(5, 3, fmm.random.key(0))
    x = fmm.random.normal(fmm.random.key(1), (2, 5, 7, 7))
    c1 = torch.nn.Conv2d(5, 3, 3, padding=1)
    c2 = torch.nn.Conv2d(3, 5, 1)
    c1.load_state_dict(p["conv1"])
    c2.load_state_dict(p["conv2"])
    want = x + c2(torch.relu(c1(torch.relu(x))))
    torch.testing.assert_close(conv.res_block(p, x), want, rtol=1e-5, atol=1e-5)


def test_init_is_a_function_of_the_key_and_starts_unbiased():
    a = conv.init_conv2d(3, 4, 3, fmm.random.key(0))
    b = conv.init_conv2d(3, 4, 3, fmm.random.key(0))
    assert torch.equal(a["weight"], b["weight"]) and a["weight"].shape == (4, 3, 3, 3)
    assert torch.equal(a["bias"], torch.zeros(4))
    t = conv.init_conv_transpose2d(3, 4, 4, fmm.random.key(0), bias=False)
    assert t.keys() == {"weight"} and t["weight"].shape == (3, 4, 4, 4)


def test_bad_input_names_the_shapes():
    p = conv.init_conv2d(3, 4, 3, fmm.random.key(0))
    with pytest.raises(ValueError, match=r"x must be \[batch, 3, H, W\].*got \[2, 5, 8, 8\]"):
        conv.conv2d(p, torch.rand(2, 5, 8, 8))
    t = conv.init_conv_transpose2d(4, 3, 4, fmm.random.key(0))
    with pytest.raises(ValueError, match=r"x must be \[batch, 4, H, W\]"):
        conv.conv_transpose2d(t, torch.rand(4, 8, 8))
    with pytest.raises(ValueError, match="kernel must be a positive int"):
        conv.init_conv2d(3, 4, 0, fmm.random.key(0))
