"""MAE: parity with TorchMultimodal's MaskedAutoEncoder (image_mae with a ViT decoder,
audio_mae with its Swin V2 decoder) on identical random weights and identical masks, the
converters' round trip and error list, and bad input by name.

Identical masks: TorchMultimodal draws its masking noise with ``torch.rand(batch,
patches)`` and ranks it (``argsort``, keep the lowest ``int(patches * (1 - ratio))``);
fmm draws the same ranking from ``fmm.random.uniform(fold_in(key, "mask"), ...)``. The test
hands TorchMultimodal fmm's noise in place of ``torch.rand`` for its forward, so both rank
the very same numbers and every output (encoder, prediction, label patches, mask) is
compared as it is, not re-ordered. Its decoder's bias-MLP dropout (0.1) is set to 0: the
forward must run in training mode, where TorchMultimodal returns the decoder's outputs.
"""

import pytest
import torch
from torch import nn

import fmm
from fmm.convert import ConversionError
from models import mae
from models.mae import MAEConfig
from tests.reference import reference

TMM = "torchmultimodal.models.masked_auto_encoder.model"

IMAGE = MAEConfig(
    input_size=(32, 32), patch_size=8, width=32, layers=2, heads=2, mlp_dim=64,
    decoder_width=16, decoder_layers=2, decoder_heads=2, decoder_mlp_dim=32,
)  # fmt: skip
# A 16 x 8 patch grid: non-square positions, and 4x4 windows that shift along frames.
AUDIO = MAEConfig(
    modality="audio", input_size=(128, 64), in_channels=1, patch_size=8, width=32, layers=2,
    heads=2, mlp_dim=64, decoder="swin", decoder_width=16, decoder_layers=2, decoder_heads=2,
    decoder_mlp_dim=32, use_cls_in_decoder=False, ratio=0.8,
)  # fmt: skip


def reference_model(cfg: MAEConfig) -> nn.Module:
    """TorchMultimodal's MAE at ``cfg``'s sizes, built by its ``image_mae`` / ``audio_mae``."""
    tmm = reference(TMM)
    sizes = dict(
        patch_size=cfg.patch_size, masking_ratio=cfg.ratio, encoder_layers=cfg.layers,
        encoder_hidden_dim=cfg.width, encoder_heads=cfg.heads,
        encoder_dim_feedforward=cfg.mlp_dim, decoder_layers=cfg.decoder_layers,
        decoder_hidden_dim=cfg.decoder_width, decoder_heads=cfg.decoder_heads,
        decoder_dim_feedforward=cfg.decoder_mlp_dim,
    )  # fmt: skip
    if cfg.modality == "image":
        return tmm.image_mae(image_size=cfg.input_size[0], **sizes)
    return tmm.audio_mae(input_size=cfg.input_size, window_size=cfg.window, **sizes)


def _randomise(model: nn.Module) -> None:
    # Norms start at ones/zeros, tau at ones: draw every weight so parity sees each one.
    # The sin-cos position tables stay as built (fixed in both).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embeddings" in name:
                continue
            shift = 1.0 if "norm" in name or name.endswith("tau") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + shift)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


@pytest.fixture(scope="module", params=["image", "audio"])
def converted(request):
    cfg = IMAGE if request.param == "image" else AUDIO
    ref = reference_model(cfg)
    _randomise(ref)
    return cfg, ref, mae.from_torchmultimodal(ref.state_dict(), cfg)


def _noise(cfg: MAEConfig, batch: int, key: torch.Tensor) -> torch.Tensor:
    """The noise fmm ranks for its mask (see the module docstring)."""
    return fmm.random.uniform(fmm.random.fold_in(key, "mask"), (batch, cfg.patches))


def test_masked_forward_matches_torchmultimodal(converted, monkeypatch):
    cfg, ref, params = converted
    x = torch.rand(3, *cfg.input_shape, generator=torch.Generator().manual_seed(1))
    key = fmm.random.key(7)
    noise = _noise(cfg, 3, key)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: noise.clone())
    with torch.no_grad():
        theirs = ref.train()(x)
    monkeypatch.undo()
    ours = mae.reconstruct(params, x, cfg=cfg, key=key)
    tol = dict(atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.mask, theirs.mask)
    assert int(ours.mask[0].sum()) == cfg.patches - cfg.kept
    torch.testing.assert_close(
        ours.encoded.sequence, theirs.encoder_output.last_hidden_state, **tol
    )
    torch.testing.assert_close(ours.pred, theirs.decoder_pred, **tol)
    torch.testing.assert_close(ours.target, theirs.label_patches, **tol)


def test_unmasked_encoder_matches_torchmultimodal_eval(converted):
    cfg, ref, params = converted
    x = torch.rand(2, *cfg.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref.eval()(x).encoder_output.last_hidden_state
    ours = mae.encode(params, x, cfg=cfg).sequence
    assert ours.shape == (2, 1 + cfg.patches, cfg.width)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_round_trip_and_strict_load(converted):
    cfg, ref, params = converted
    sd = mae.to_torchmultimodal(params, cfg)
    fresh = reference_model(cfg)
    fresh.load_state_dict(sd, strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=1e-6, rtol=0, msg=k)
    again = mae.from_torchmultimodal(sd, cfg)
    flat, flat_again = fmm.tree.flatten(params), fmm.tree.flatten(again)
    assert flat.keys() == flat_again.keys()
    assert all(torch.equal(flat[k], flat_again[k]) for k in flat)


def test_a_bad_state_dict_lists_every_problem(converted):
    cfg, ref, _ = converted
    sd = dict(ref.state_dict())
    del sd["encoder.final_layer_norm.weight"]
    sd["encoder.extra"] = torch.zeros(1)
    sd["decoder_pred.weight"] = torch.zeros(3, 3)
    with pytest.raises(ConversionError) as err:
        mae.from_torchmultimodal(sd, cfg)
    text = str(err.value)
    assert "missing: encoder.final_layer_norm.weight" in text
    assert "unexpected: encoder.extra" in text
    assert "mismatched decoder_pred.weight" in text
    learned = dict(ref.state_dict())
    learned["embeddings.position_embeddings"] = torch.randn_like(
        learned["embeddings.position_embeddings"]
    )
    with pytest.raises(ConversionError, match=r"embeddings\.position_embeddings is not the fixed"):
        mae.from_torchmultimodal(learned, cfg)


def test_bad_inputs_are_refused_by_name():
    cfg = mae.mae_tiny()
    params = mae.init(cfg, fmm.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 3, 32, 32\]"):
        mae.encode(params, torch.rand(2, 3, 16, 16), cfg=cfg)
    with pytest.raises(ValueError, match="key= is missing"):
        mae.loss(params, {"images": torch.rand(2, 3, 32, 32)}, cfg=cfg)
    with pytest.raises(ValueError, match="images"):
        mae.loss(params, {"pixels": torch.rand(2, 3, 32, 32)}, cfg=cfg, key=fmm.random.key(1))
    with pytest.raises(ValueError, match="ratio"):
        MAEConfig(ratio=1.0)
    with pytest.raises(ValueError, match="patch_size"):
        MAEConfig(input_size=(100, 128))
