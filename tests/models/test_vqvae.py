"""models.vqvae: shapes, batch independence, pure codebook updates, gradients, learning, errors."""

import pytest
import torch

import fmm
from fmm import optim
from fmm.step import init_state, make_train_step
from models import vqvae

# Real structure (two stride-2 stages, residual blocks), small widths: fast on a CPU.
CFG = vqvae.VQVAEConfig(image_size=16, channels=(8, 16), res_blocks=1, res_hidden=8, code_dim=6,
                        codebook_size=11)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return vqvae.init(CFG, fmm.random.key(0))


def test_encode_gives_codes_in_range_and_decode_gives_images(params):
    images = torch.rand(3, 3, 16, 16)
    codes = vqvae.encode(params, images, cfg=CFG)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < CFG.codebook_size
    assert vqvae.decode(params, codes, cfg=CFG).shape == images.shape
    out = vqvae.apply(params, images, cfg=CFG)
    assert torch.equal(out["codes"], codes)
    # apply's reconstruction is the decoding of its codes (straight-through changes no value)
    torch.testing.assert_close(out["reconstruction"], vqvae.decode(params, codes, cfg=CFG))


def test_encoding_is_independent_across_the_batch(params):
    images = torch.rand(4, 3, 16, 16)
    z = vqvae.encode_latents(params, images, cfg=CFG)
    for i in range(4):
        torch.testing.assert_close(
            vqvae.encode_latents(params, images[i : i + 1], cfg=CFG)[0], z[i], rtol=1e-5, atol=1e-6
        )


def test_loss_trains_the_autoencoder_but_never_the_codebook(params):
    batch = {"images": torch.rand(2, 3, 16, 16)}
    grads = torch.func.grad(lambda p: vqvae.loss(p, batch, cfg=CFG)[0])(params)
    assert torch.count_nonzero(grads["codebook"]["weight"]) == 0
    # the straight-through estimator carries the reconstruction error back into the encoder
    assert torch.count_nonzero(grads["encoder"]["down"][0]["weight"]) > 0
    assert torch.count_nonzero(grads["decoder"]["up"][-1]["weight"]) > 0


def test_update_codebook_is_pure_and_sets_the_codebook_from_the_ema(params):
    state = vqvae.init_codebook_state(params)
    snapshot = [x.clone() for x in fmm.tree.leaves((params, state))]
    images = torch.rand(5, 3, 16, 16)
    new_params, new_state, info = vqvae.update_codebook(
        params, state, images, cfg=CFG, key=fmm.random.key(1)
    )
    assert all(torch.equal(a, b) for a, b in zip(snapshot, fmm.tree.leaves((params, state))))
    torch.testing.assert_close(
        new_params["codebook"]["weight"], fmm.nn.codebook.codebook_from_ema(new_state, eps=CFG.eps)
    )
    assert new_params["encoder"] is params["encoder"]  # only the codebook moves
    assert not torch.equal(new_state["embed_sum"], state["embed_sum"])
    assert 0 <= int(info["restarted"]) <= CFG.codebook_size
    again = vqvae.update_codebook(params, state, images, cfg=CFG, key=fmm.random.key(1))
    assert torch.equal(again[0]["codebook"]["weight"], new_params["codebook"]["weight"])


def test_a_few_steps_lower_the_reconstruction_error():
    params = vqvae.init(CFG, fmm.random.key(0))
    opt = optim.adamw(3e-3, decay_mask=lambda path: False)
    state = init_state(params, opt, key=fmm.random.key(1))
    ema = vqvae.init_codebook_state(params)
    step = make_train_step(lambda p, b, k: vqvae.loss(p, b, cfg=CFG), opt)
    # blocky two-colour images: learnable in a few dozen steps
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 1, 1, generator=g).expand(16, 3, 16, 16).clone()
    images[:, :, 4:12, 4:12] = torch.rand(16, 3, 1, 1, generator=g)
    batch = {"images": images}
    first = float(vqvae.loss(params, batch, cfg=CFG)[1]["recon_mse"])
    for i in range(25):
        state, _ = step(state, batch)
        p, ema, _ = vqvae.update_codebook(
            state["params"], ema, images, cfg=CFG, key=fmm.random.key(i)
        )
        state = {**state, "params": p}
    last = float(vqvae.loss(state["params"], batch, cfg=CFG)[1]["recon_mse"])
    assert last < 0.3 * first


def test_the_familys_state_update_after_each_step_is_update_codebook_on_the_new_params():
    # What the one training loop runs (loss with state=, then update_state with metrics'
    # aux) against what the VQ-VAE recipe ran (the step, then update_codebook), bit for bit.
    family, opt = vqvae.FAMILY, optim.adamw(3e-3, decay_mask=lambda path: False)
    params = vqvae.init(CFG, fmm.random.key(0))
    plain = init_state(params, opt, key=fmm.random.key(1))
    ours = init_state(params, opt, key=fmm.random.key(1))
    plain_ema = vqvae.init_codebook_state(params)
    ours_ema = family.init_state(CFG, params, fmm.random.key(2))
    plain_step = make_train_step(lambda p, b, k: vqvae.loss(p, b, cfg=CFG), opt)
    g = torch.Generator().manual_seed(3)
    for i in range(3):
        batch = {"images": torch.rand(4, 3, 16, 16, generator=g)}
        restart = fmm.random.fold_in(fmm.random.key(4), i)
        plain, _ = plain_step(plain, batch)
        p, plain_ema, _ = vqvae.update_codebook(
            plain["params"], plain_ema, batch["images"], cfg=CFG, key=restart
        )
        plain = {**plain, "params": p}
        step = make_train_step(
            lambda p, b, k, ema=ours_ema: family.loss(p, b, cfg=CFG, key=k, state=ema), opt
        )
        ours, metrics = step(ours, batch)
        aux = metrics.pop("aux")
        assert all(v.ndim == 0 for v in metrics.values())
        p, ours_ema = family.update_state(ours_ema, ours["params"], aux, cfg=CFG, key=restart)
        ours = {**ours, "params": p}
    for a, b in zip(fmm.tree.leaves((plain, plain_ema)), fmm.tree.leaves((ours, ours_ema))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"aux lacks \['images'\]"):
        family.update_state(ours_ema, ours["params"], {}, cfg=CFG, key=fmm.random.key(0))


def test_the_loss_and_the_codebook_update_compile_as_one_graph(params):
    # code_usage's histogram has a static size, so the perplexity metric breaks no graph.
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    state = vqvae.init_codebook_state(params)

    def loss_then_update(p, images, state):
        value, metrics = vqvae.loss(p, {"images": images}, cfg=CFG)
        return (
            value,
            metrics["perplexity"],
            vqvae.update_state(state, p, metrics["aux"], cfg=CFG, key=fmm.random.key(6)),
        )

    compiled = torch.compile(loss_then_update, fullgraph=True, backend="aot_eager")
    for got, want in zip(
        fmm.tree.leaves(compiled(params, images, state)),
        fmm.tree.leaves(loss_then_update(params, images, state)),
    ):
        torch.testing.assert_close(got, want)


def test_bad_input_is_refused_with_shapes(params):
    with pytest.raises(
        ValueError, match=r"images must have shape \[batch, 3, 16, 16\], got \[2, 3, 8, 8\]"
    ):
        vqvae.encode(params, torch.rand(2, 3, 8, 8), cfg=CFG)
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        vqvae.encode(params, torch.zeros(2, 3, 16, 16, dtype=torch.long), cfg=CFG)
    with pytest.raises(ValueError, match=r"codes must have shape \[batch, 4, 4\]"):
        vqvae.decode(params, torch.zeros(2, 5, 5, dtype=torch.long), cfg=CFG)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 11\)"):
        vqvae.decode(params, torch.full((1, 4, 4), 11), cfg=CFG)
    with pytest.raises(ValueError, match="image_size=20 is not a multiple"):
        vqvae.VQVAEConfig(image_size=20, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="decay must be in"):
        vqvae.VQVAEConfig(decay=1.0)
