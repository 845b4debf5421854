"""fmm.invariance: ColumnLinears computes linear layers with the rows as the product's
columns: the same numbers up to rounding, the same layout, nothing else touched, nestable,
traceable into one compiled graph; and a row's result the same at every row count where
the BLAS allows it (what the serving probe measures, not assumed here)."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import fmm
from fmm import quant
from fmm.invariance import (
    ColumnLinears,
    PackedLinears,
    column_linears,
    columns_matmul,
    mkl_reproducible,
    packed_available,
)
from models import gpt

CFG = gpt.GPTConfig(vocab_size=97, context_length=16, width=32, layers=2, heads=4)
PARAMS = gpt.init(CFG, fmm.random.key(0))


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), k=st.integers(1, 40),
       out=st.integers(1, 40), seed=st.integers(0, 99))  # fmt: skip
def test_columns_matmul_is_the_matmul_up_to_rounding(lead, k, out, seed):
    g = torch.Generator().manual_seed(seed)
    x, m = torch.randn(*lead, k, generator=g), torch.randn(k, out, generator=g)
    got = columns_matmul(x, m)
    assert got.shape == (*lead, out) and got.is_contiguous()
    torch.testing.assert_close(got, x @ m, rtol=1e-5, atol=1e-5)


def test_a_single_row_is_computed_as_two_and_rounds_as_they_do():
    torch.manual_seed(0)
    w, x = torch.randn(300, 96), torch.randn(1, 96)
    assert torch.equal(columns_matmul(x, w.t()), columns_matmul(torch.cat([x, x]), w.t())[:1])


def test_the_model_under_the_mode_matches_plain_and_keeps_its_layout():
    ids = torch.randint(0, 97, (3, 7))
    plain = gpt.apply(PARAMS, ids, cfg=CFG)
    with ColumnLinears():
        cols = gpt.apply(PARAMS, ids, cfg=CFG)
        bias = F.linear(torch.randn(4, 32), torch.randn(8, 32), torch.randn(8))
    torch.testing.assert_close(cols, plain, rtol=1e-5, atol=1e-5)
    assert cols.is_contiguous() and bias.is_contiguous() and bias.shape == (4, 8)


def test_products_of_two_batches_and_int8_weights_are_left_alone():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8)
    w = quant.quantize_weight(torch.randn(64, 32))
    x = torch.randn(3, 32)
    with ColumnLinears():
        scores, int8 = q @ k.transpose(-1, -2), F.linear(x, w)
    assert torch.equal(scores, q @ k.transpose(-1, -2))
    assert torch.equal(int8, F.linear(x, w))


def test_nesting_the_mode_does_not_turn_the_product_back():
    torch.manual_seed(0)
    x, w = torch.randn(5, 96), torch.randn(200, 96)
    with ColumnLinears():
        once = F.linear(x, w)
        with ColumnLinears():
            twice = F.linear(x, w)
    assert torch.equal(once, twice)
    assert torch.equal(once, columns_matmul(x, w.t()))


def test_the_mode_traces_into_one_compiled_graph_with_the_eager_numbers():
    ids = torch.randint(0, 97, (2, 5))
    run = column_linears(lambda p, i: gpt.apply(p, i, cfg=CFG))
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(PARAMS, ids), run(PARAMS, ids))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_at_a_fixed_row_count_a_row_does_not_depend_on_the_others(n):
    # The law the pool's exactness rests on, kept under the mode.
    torch.manual_seed(n)
    w, x = torch.randn(300, 96), torch.randn(96)
    rows = []
    for slot in range(n):
        batch = torch.randn(n, 96)
        batch[slot] = x
        with ColumnLinears():
            rows.append(F.linear(batch, w)[slot])
    assert all(torch.equal(rows[0], r) for r in rows)


def test_import_fmm_turns_on_mkls_reproducibility():
    # conftest imports fmm before anything computes, as a server's entry point does.
    assert mkl_reproducible() in (True, None)  # None: a torch without MKL


@pytest.mark.parametrize("seed", range(4))
def test_equal_rows_of_a_masked_batched_attention_are_equal(seed):
    # Torch's CPU flash attention runs MKL on each thread's own buffers: without MKL's
    # reproducibility, rows 1 and 2 here differed in 18 of 20 seeds on an AMD EPYC (AVX-512).
    torch.manual_seed(seed)
    q, k, v = torch.randn(4, 4, 1, 8), torch.randn(4, 4, 40, 8), torch.randn(4, 4, 40, 8)
    q[2], k[2], v[2] = q[1], k[1], v[1]
    mask = (torch.arange(40) <= torch.tensor([0, 12, 12, 0])[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    alone = F.scaled_dot_product_attention(q[1:2].clone(), k[1:2].clone(), v[1:2].clone(),
                                           attn_mask=mask[1:2].clone())  # fmt: skip
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], alone[0])


def test_gradients_flow_through_the_column_product():
    torch.manual_seed(0)
    x, m = torch.randn(3, 4, 8, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    gx, gm = torch.autograd.grad(columns_matmul(x, m).square().sum(), (x, m))
    wx, wm = torch.autograd.grad((x @ m).square().sum(), (x, m))
    torch.testing.assert_close((gx, gm), (wx, wm), rtol=1e-5, atol=1e-5)


needs_onednn = pytest.mark.skipif(not packed_available(), reason="this torch has no oneDNN")


@needs_onednn
def test_packed_linears_match_plain_ones_eager_and_compiled():
    ids = torch.randint(0, 97, (3, 7))
    plain = gpt.apply(PARAMS, ids, cfg=CFG)

    def run(p, i):
        with PackedLinears():
            return gpt.apply(p, i, cfg=CFG)

    with torch.inference_mode():
        eager = run(PARAMS, ids)
        compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(PARAMS, ids)
    torch.testing.assert_close(eager, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled, eager)


@needs_onednn
def test_a_packed_weight_is_packed_again_once_it_is_written():
    torch.manual_seed(0)
    x, w = torch.randn(4, 32), torch.randn(16, 32)
    with torch.inference_mode(), PackedLinears():
        before = F.linear(x, w)
        w.mul_(2)  # a new version: the packed copy of the old values must not serve it
        after = F.linear(x, w)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_linears_leave_other_dtypes_and_int8_weights_alone():
    torch.manual_seed(0)
    x, w = torch.randn(3, 32, dtype=torch.float64), torch.randn(8, 32, dtype=torch.float64)
    q, xf = quant.quantize_weight(torch.randn(64, 32)), torch.randn(3, 32)
    want = F.linear(x, w), F.linear(xf, q)
    with PackedLinears():
        got = F.linear(x, w), F.linear(xf, q)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_onednn
def test_packed_linears_take_weights_made_in_inference_mode():
    # Such a weight keeps no version counter; it is packed all the same.
    with torch.inference_mode():
        x, w, b = torch.randn(3, 32), torch.randn(8, 32), torch.randn(8)
        want = F.linear(x, w, b)
        with PackedLinears():
            got = F.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
