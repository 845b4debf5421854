"""MAE's laws: the masking keeps exactly its share and each kept patch once, restore inverts
the shuffle, same key same mask, the loss ignores visible patches, patchify round-trips,
spectrogram shapes, and the image decoder's blocks reach the adapter's seam."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fmm
from fmm.adapter import ModelAdapter
from models import mae

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    batch=st.integers(1, 4),
    patches=st.integers(1, 300),
    ratio=st.floats(0.0, 0.95),
)
def test_masking_keeps_its_share_once_each_and_restore_inverts_the_shuffle(
    seed, batch, patches, ratio
):
    kept = int(patches * (1 - ratio))
    if kept < 1:
        return
    keep, restore, mask = fmm.random.random_masking(fmm.random.key(seed), batch, patches, ratio)
    assert keep.shape == (batch, kept) and restore.shape == mask.shape == (batch, patches)
    for row in range(batch):
        assert len(set(keep[row].tolist())) == kept  # each kept index once
    assert torch.equal(mask.sum(1), torch.full((batch,), float(patches - kept)))
    # The kept patches are exactly the unmasked ones.
    assert torch.all(mask.gather(1, keep) == 0)
    # restore inverts the shuffle: the visible patches then fillers, gathered at restore,
    # put every visible patch back at its own index and a filler at each masked one.
    ids = torch.arange(patches).expand(batch, -1)
    fill = torch.full((batch, patches - kept), -1)
    back = torch.cat([ids.gather(1, keep), fill], 1).gather(1, restore)
    assert torch.equal(back, torch.where(mask.bool(), -1, ids))
    assert torch.equal(restore.sort(1).values, ids)  # a permutation


def test_same_key_same_mask_different_keys_different_masks():
    a = fmm.random.random_masking(fmm.random.key(1), 4, 196, 0.75)
    b = fmm.random.random_masking(fmm.random.key(1), 4, 196, 0.75)
    c = fmm.random.random_masking(fmm.random.key(2), 4, 196, 0.75)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    # TorchMultimodal's rounding: the floor of patches * (1 - ratio).
    assert fmm.random.random_masking(fmm.random.key(0), 1, 512, 0.8)[0].shape[1] == 102


def test_masking_is_the_same_compiled():
    fn = torch.compile(lambda k: fmm.random.random_masking(k, 2, 64, 0.75), backend="aot_eager")
    want = fmm.random.random_masking(fmm.random.key(3), 2, 64, 0.75)
    assert all(torch.equal(x, y) for x, y in zip(fn(fmm.random.key(3)), want))


@SETTINGS
@given(seed=st.integers(0, 2**31), norm_pix=st.booleans())
def test_the_loss_ignores_visible_patches(seed, norm_pix):
    g = torch.Generator().manual_seed(seed)
    pred, target = torch.randn(2, 16, 12, generator=g), torch.randn(2, 16, 12, generator=g)
    _, _, mask = fmm.random.random_masking(fmm.random.key(seed), 2, 16, 0.75)
    want = mae.masked_loss(pred, target, mask, norm_pix=norm_pix)
    spoiled = torch.where(mask.bool()[..., None], pred, torch.randn(2, 16, 12, generator=g) * 100)
    torch.testing.assert_close(mae.masked_loss(spoiled, target, mask, norm_pix=norm_pix), want)
    # ... and does read the masked ones.
    moved = torch.where(mask.bool()[..., None], pred + 1.0, pred)
    assert not torch.allclose(mae.masked_loss(moved, target, mask, norm_pix=norm_pix), want)


def test_norm_pix_targets_are_zero_mean_unit_variance_per_patch():
    target = torch.randn(1, 4, 48) * 5 + 3
    mask = torch.ones(1, 4)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert mae.masked_loss(normed, target, mask, norm_pix=True) < 1e-10
    assert math.isclose(
        float(mae.masked_loss(torch.zeros(1, 4, 48), target, mask, norm_pix=True)),
        47 / 48,
        rel_tol=1e-4,
    )


@SETTINGS
@given(seed=st.integers(0, 2**31), audio=st.booleans())
def test_patchify_and_unpatchify_round_trip(seed, audio):
    cfg = mae.mae_audio_tiny() if audio else mae.mae_tiny()
    x = torch.rand(2, *cfg.input_shape, generator=torch.Generator().manual_seed(seed))
    patches = mae.patchify(x, cfg.patch_size)
    assert patches.shape == (2, cfg.patches, cfg.patch_dim)
    assert torch.equal(mae.unpatchify(patches, cfg), x)
    # Patch k is the k-th p x p tile in row-major order.
    p, gw = cfg.patch_size, cfg.grid[1]
    k = 5
    tile = x[:, :, (k // gw) * p : (k // gw + 1) * p, (k % gw) * p : (k % gw + 1) * p]
    assert torch.equal(patches[:, k], tile.permute(0, 2, 3, 1).flatten(1))


def test_spectrogram_shapes():
    cfg = mae.mae_audio_tiny()  # [batch, 1, frames, mels]
    params = mae.init(cfg, fmm.random.key(0))
    spec = torch.rand(3, 1, 64, 32)
    out = mae.reconstruct(params, spec, cfg=cfg, key=fmm.random.key(1), train=True)
    assert out.encoded.sequence.shape == (3, 1 + cfg.kept, cfg.width)
    assert out.pred.shape == out.target.shape == (3, cfg.patches, 64)
    assert mae.unpatchify(out.pred, cfg).shape == spec.shape
    assert mae.encode(params, spec, cfg=cfg).sequence.shape == (3, 1 + cfg.patches, cfg.width)
    # Full-size AudioMAE: 1024 frames x 128 mels, 64 x 8 patches, 102 of 512 visible.
    big = mae.mae_audio_vit_b16()
    assert (big.grid, big.patches, big.kept, big.input_shape) == ((64, 8), 512, 102, (1, 1024, 128))


def test_the_mask_depends_only_on_the_key_and_the_encoder_sees_visible_patches_only():
    cfg = mae.mae_tiny()
    params = mae.init(cfg, fmm.random.key(0))
    x = torch.rand(2, *cfg.input_shape)
    a = mae.reconstruct(params, x, cfg=cfg, key=fmm.random.key(4))
    b = mae.reconstruct(params, x * 0.5, cfg=cfg, key=fmm.random.key(4))
    assert torch.equal(a.mask, b.mask)
    # Changing a masked patch's pixels leaves the encoder output unchanged.
    masked = a.mask.bool()
    patches = mae.patchify(x, cfg.patch_size)
    spoiled = torch.where(masked[..., None], torch.rand_like(patches), patches)
    c = mae.reconstruct(params, mae.unpatchify(spoiled, cfg), cfg=cfg, key=fmm.random.key(4))
    torch.testing.assert_close(c.encoded.sequence, a.encoded.sequence)


def test_the_image_decoder_runs_every_block_through_the_adapter():
    # The contract suite runs the family's smallest preset (the audio one, Swin decoder);
    # this checks the ViT decoder's blocks reach block_fn too.
    cfg = mae.mae_tiny()
    params = mae.init(cfg, fmm.random.key(0))
    batch = {"images": torch.rand(2, *cfg.input_shape)}
    key = fmm.random.key(1)
    fn = lambda p, b, *, block_fn: mae.loss(p, b, cfg=cfg, key=key, block_fn=block_fn)[0]
    model = ModelAdapter(params, fn)
    ran = set()
    for i, block in enumerate(model.block_modules()):
        block.register_forward_pre_hook(lambda *_, i=i: ran.add(i))
    got = model(batch)
    assert ran == set(range(cfg.layers + cfg.decoder_layers))
    torch.testing.assert_close(got, mae.loss(params, batch, cfg=cfg, key=key)[0])


def test_composite_is_the_input_when_the_prediction_is_perfect():
    cfg = mae.mae_tiny()
    params = mae.init(cfg, fmm.random.key(0))
    x = torch.rand(2, *cfg.input_shape)
    out = mae.reconstruct(params, x, cfg=cfg, key=fmm.random.key(1))
    t = out.target
    perfect = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(mae.composite(out._replace(pred=perfect), cfg), x)
    # Visible patches are the input's whatever the prediction.
    shown = mae.patchify(mae.composite(out, cfg), cfg.patch_size)
    visible = ~out.mask.bool()
    assert torch.equal(shown[visible], t[visible])
