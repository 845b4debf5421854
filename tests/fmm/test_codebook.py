"""fmm.nn.codebook and fmm.losses.vq: quantisation laws, pure EMA state, dead-code restarts."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm.losses.vq import commitment_loss, reconstruction_loss
from fmm.nn import codebook as vq


def _clone(state):
    return fmm.tree.map(torch.clone, state)


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(fmm.tree.leaves(a), fmm.tree.leaves(b)))


@given(num=st.integers(1, 9), dim=st.integers(1, 5), n=st.integers(1, 13), seed=st.integers(0, 99))
def test_codes_are_in_range_and_nearest(num, dim, n, seed):
    book = vq.init_codebook(num, dim, fmm.random.key(seed))
    z = fmm.random.normal(fmm.random.key(seed + 1000), (n, 3, dim)) * 2
    codes = vq.nearest_codes(book, z)
    assert codes.shape == (n, 3) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < num
    dist = torch.cdist(z.reshape(-1, dim).double(), book["weight"].double())
    chosen = dist.gather(1, codes.reshape(-1, 1))[:, 0]
    torch.testing.assert_close(chosen, dist.min(1).values, rtol=1e-5, atol=1e-5)


def test_straight_through_forwards_codes_and_passes_gradients_unchanged():
    book = vq.init_codebook(7, 5, fmm.random.key(0))
    z = fmm.random.normal(fmm.random.key(1), (4, 5))
    upstream = fmm.random.normal(fmm.random.key(2), (4, 5))

    def f(z):
        z_st, _, _ = vq.quantize(book, z)
        return (z_st * upstream).sum()

    z_st, codes, z_q = vq.quantize(book, z)
    torch.testing.assert_close(z_st, z_q)  # equal up to the rounding of z + (z_q - z)
    assert torch.equal(z_q, book["weight"][codes])
    # d/dz of sum(upstream * z_st) is upstream itself: the estimator's Jacobian is the identity.
    torch.testing.assert_close(torch.func.grad(f)(z), upstream)
    jac = torch.func.jacrev(lambda z: vq.straight_through(z, z_q))(z)
    torch.testing.assert_close(jac.reshape(20, 20), torch.eye(20))


def test_quantize_sends_no_gradient_to_the_codebook():
    book = vq.init_codebook(7, 5, fmm.random.key(0))
    z = fmm.random.normal(fmm.random.key(1), (4, 5))

    def f(weight):
        z_st, _, z_q = vq.quantize({"weight": weight}, z)
        return z_st.sum() + commitment_loss(z, z_q)

    assert torch.count_nonzero(torch.func.grad(f)(book["weight"])) == 0


def test_fresh_ema_state_reproduces_the_codebook():
    book = vq.init_codebook(6, 4, fmm.random.key(0))
    torch.testing.assert_close(vq.codebook_from_ema(vq.init_ema_state(book)), book["weight"])


def test_ema_update_is_pure_and_follows_the_formula():
    book = vq.init_codebook(5, 3, fmm.random.key(0))
    state = vq.init_ema_state(book)
    before = _clone(state)
    z = fmm.random.normal(fmm.random.key(1), (2, 4, 3))
    codes = vq.nearest_codes(book, z)
    new = vq.ema_update(state, z, codes, decay=0.9)
    assert _equal(state, before)  # the old state is untouched
    onehot = torch.nn.functional.one_hot(codes.reshape(-1), 5).float()
    torch.testing.assert_close(
        new["cluster_size"], 0.9 * before["cluster_size"] + 0.1 * onehot.sum(0)
    )
    torch.testing.assert_close(
        new["embed_sum"], 0.9 * before["embed_sum"] + 0.1 * onehot.T @ z.reshape(-1, 3)
    )


def test_ema_moves_each_code_to_the_mean_of_its_vectors():
    book = {"weight": torch.tensor([[0.0, 0.0], [10.0, 10.0]])}
    z = torch.tensor([[1.0, 1.0], [1.0, 3.0], [9.0, 9.0], [11.0, 13.0]])
    state = vq.init_ema_state(book)
    for _ in range(200):
        state = vq.ema_update(state, z, vq.nearest_codes(book, z), decay=0.9)
        book = {"weight": vq.codebook_from_ema(state)}
    torch.testing.assert_close(
        book["weight"], torch.tensor([[1.0, 2.0], [10.0, 11.0]]), atol=1e-3, rtol=0
    )


def test_dead_codes_restart_on_encoder_outputs_and_live_ones_stay():
    book = vq.init_codebook(6, 3, fmm.random.key(0))
    state = vq.init_ema_state(book)
    state["cluster_size"] = torch.tensor([5.0, 0.0, 5.0, 1e-4, 5.0, 5.0])
    before = _clone(state)
    z = fmm.random.normal(fmm.random.key(1), (10, 3)) + 100.0
    new, dead = vq.restart_dead_codes(state, z, fmm.random.key(2), threshold=0.5)
    assert _equal(state, before)
    assert dead.tolist() == [False, True, False, True, False, False]
    weight = vq.codebook_from_ema(new)
    for i in (1, 3):  # each restarted code sits exactly on one of z's vectors
        assert torch.isclose(weight[i][None], z, atol=1e-3).all(-1).any()
    live = ~dead
    assert torch.equal(new["embed_sum"][live], before["embed_sum"][live])
    assert torch.equal(new["cluster_size"][live], before["cluster_size"][live])
    again, _ = vq.restart_dead_codes(state, z, fmm.random.key(2), threshold=0.5)
    assert _equal(new, again)  # a function of the key alone


def test_code_usage_perplexity_bounds():
    uniform = vq.code_usage(torch.arange(8).repeat(3), 8)
    torch.testing.assert_close(uniform["perplexity"], torch.tensor(8.0))
    assert uniform["fraction_used"] == 1.0
    one = vq.code_usage(torch.full((10,), 2), 8)
    torch.testing.assert_close(one["perplexity"], torch.tensor(1.0))
    assert one["fraction_used"] == 1 / 8


def test_losses_are_mean_squared_errors():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert commitment_loss(a, b) == 4.0 and reconstruction_loss(a, b) == 4.0


def test_bad_input_is_refused_with_shapes():
    book = vq.init_codebook(4, 3, fmm.random.key(0))
    with pytest.raises(ValueError, match=r"z must be a float tensor \[\.\.\., 3\].*\[2, 5\]"):
        vq.nearest_codes(book, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        vq.lookup(book, torch.tensor([0, 4]))
    state = vq.init_ema_state(book)
    with pytest.raises(ValueError, match="decay must be in"):
        vq.ema_update(state, torch.rand(2, 3), torch.zeros(2, dtype=torch.long), decay=1.0)
    with pytest.raises(ValueError, match="codes must be z's shape"):
        vq.ema_update(state, torch.rand(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="one shape"):
        commitment_loss(torch.rand(2, 3), torch.rand(3, 2))
