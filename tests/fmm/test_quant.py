"""fmm.quant: int8 weight-only quantization keeps models' outputs, shrinks their files, and
runs through the same ``apply`` calls as fp32 params."""

import pytest
import torch
import torch.nn.functional as F

import fmm
from fmm import quant
from models import clip, gpt
from train import checkpoint
from train.data import WordTokenizer, WorldConfig, eval_set
from train.recipes.clip import normalize_images


@pytest.fixture(scope="module")
def tiny():
    world = WorldConfig()
    tok = WordTokenizer.for_world(world)
    cfg = clip.clip_tiny(vocab_size=tok.vocab_size)
    params = clip.init(cfg, fmm.random.key(0))
    return world, tok, cfg, params, quant.quantize(params)


def _tokens(tok, cfg, texts):
    return tok.encode(texts, cfg.context_length)


def test_quantized_clip_embeddings_have_cosine_at_least_099_to_fp32(tiny):
    world, tok, cfg, params, q = tiny
    images, _ = eval_set(world, 1, seed=0)
    texts = ["a small red circle above a blue square", "a big green triangle", "a blue square"]
    with torch.no_grad():
        for encode, x in (
            (clip.encode_image, normalize_images(images)),
            (clip.encode_text, _tokens(tok, cfg, texts)),
        ):
            ref, got = encode(params, x, cfg=cfg), encode(q, x, cfg=cfg)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            assert F.cosine_similarity(ref, got).min() >= 0.99


def test_nearest_class_mean_accuracy_drops_at_most_one_point(tiny):
    # Class means of fp32 image embeddings on the shapes world classify held-out images;
    # int8 embeddings classified against the same means must score within one point.
    world, _, cfg, params, q = tiny
    train_images, train_labels = eval_set(world, 4, seed=10)
    test_images, test_labels = eval_set(world, 4, seed=11)
    with torch.no_grad():
        emb = clip.encode_image(params, normalize_images(train_images), cfg=cfg)
        means = F.normalize(
            torch.stack([emb[train_labels == c].mean(0) for c in range(24)]), dim=-1
        )
        acc = {}
        for name, p in (("fp32", params), ("int8", q)):
            pred = (clip.encode_image(p, normalize_images(test_images), cfg=cfg) @ means.T).argmax(
                -1
            )
            acc[name] = (pred == test_labels).float().mean().item()
    assert acc["fp32"] > 2 / 24  # the probe is informative, far above chance
    assert acc["fp32"] - acc["int8"] <= 0.01


def test_quantize_is_pure_and_replaces_only_2d_weights(tiny):
    _, _, _, params, q = tiny
    flat, qflat = fmm.tree.flatten(params), fmm.tree.flatten(q)
    assert flat.keys() == qflat.keys()
    for name, leaf in qflat.items():
        if isinstance(leaf, quant.QuantizedWeight):
            assert name.endswith(".weight") and flat[name].ndim == 2
            assert leaf.shape == flat[name].shape and leaf.dtype == flat[name].dtype
        else:
            assert leaf is flat[name]  # shared, not copied
    assert isinstance(qflat["image.transformer.blocks.0.attn.qkv.weight"], quant.QuantizedWeight)
    assert isinstance(qflat["text.token.weight"], quant.QuantizedWeight)
    assert not isinstance(qflat["image.pos"], quant.QuantizedWeight)  # a table added, not looked up
    assert all(isinstance(v, torch.Tensor) for v in flat.values())  # input untouched
    assert quant.is_quantized(q) and not quant.is_quantized(params)
    again = fmm.tree.flatten(quant.quantize(q))
    assert all(again[k] is qflat[k] for k in qflat)  # quantizing twice is quantizing once


@pytest.mark.parametrize("shape", [(3, 5), (7, 11), (64, 33)])
def test_rounding_error_is_at_most_half_a_step_per_output_channel(shape):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0])[:, None]
    w[0] = 0.0
    qw = quant.quantize_weight(w)
    assert qw.values.dtype == torch.int8 and qw.scale.shape == (shape[0],)
    assert qw.values.abs().max() <= 127 and qw.scale[0] == 1.0
    err = (qw.dequantize() - w).abs()
    assert (err <= qw.scale[:, None] / 2 + 1e-7 * w.abs()).all()
    # every non-zero row spans the full int8 range: per-channel, not per-tensor, scales
    assert (qw.values[1:].abs().amax(1) == 127).all()


def test_linear_fast_path_is_close_and_grad_path_is_exact_float():
    w, b = torch.randn(37, 53) * 0.1, torch.randn(37)
    qw = quant.quantize_weight(w)
    x = torch.randn(2, 5, 53)
    exact = F.linear(x, qw.dequantize(), b)
    fast = fmm.nn.linear({"weight": qw, "bias": b}, x)
    assert fast.shape == (2, 5, 37)
    torch.testing.assert_close(fast, exact, atol=0.05, rtol=0.02)
    xg = x.clone().requires_grad_()
    y = fmm.nn.linear({"weight": qw, "bias": b}, xg)
    assert torch.equal(y, exact)  # with autograd it runs on the dequantized weight
    y.sum().backward()
    assert xg.grad.shape == x.shape
    with pytest.raises(ValueError, match=r"53.*\[37, 53\]|input has 4 features"):
        fmm.nn.linear({"weight": qw}, torch.randn(2, 4))


def test_nan_activations_propagate_like_fp32_instead_of_raising():
    qw = quant.quantize_weight(torch.randn(6, 5))
    x = torch.randn(3, 5)
    x[1, 2] = float("nan")
    y = fmm.nn.linear({"weight": qw}, x)
    assert torch.equal(y.isnan(), F.linear(x, qw.dequantize()).isnan())


def test_embedding_lookup_rescales_the_gathered_rows_exactly():
    table = torch.randn(50, 16)
    qt = quant.quantize_weight(table)
    ids = torch.tensor([[0, 49, 3], [3, 3, 7]])
    assert torch.equal(fmm.nn.embed({"weight": qt}, ids), F.embedding(ids, qt.dequantize()))


def test_tied_output_head_calling_f_linear_directly_runs_quantized():
    cfg = gpt.gpt_tiny()
    params = gpt.init(cfg, fmm.random.key(1))
    q = quant.quantize(params, min_size=1024)
    assert isinstance(q["token"]["weight"], quant.QuantizedWeight)
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = gpt.apply(params, tokens, cfg=cfg)
        got = gpt.apply(q, tokens, cfg=cfg)
    assert got.shape == ref.shape
    assert F.cosine_similarity(ref.flatten(1), got.flatten(1)).min() >= 0.99


def test_saved_int8_file_is_under_03_of_fp32_and_reloads_identically(tiny, tmp_path):
    _, tok, cfg, params, q = tiny
    checkpoint.save_params(tmp_path / "fp32.safetensors", params)
    quant.save_quantized(tmp_path / "int8.safetensors", q)
    ratio = (tmp_path / "int8.safetensors").stat().st_size / (
        tmp_path / "fp32.safetensors"
    ).stat().st_size
    assert ratio <= 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.safetensors", "int8.safetensors"]
    assert quant.size_bytes(q) / quant.size_bytes(params) == pytest.approx(ratio, abs=0.01)
    back = quant.load_quantized(tmp_path / "int8.safetensors")
    flat, bflat = fmm.tree.flatten(q), fmm.tree.flatten(back)
    assert flat.keys() == bflat.keys()
    for name, leaf in flat.items():
        got = bflat[name]
        if isinstance(leaf, quant.QuantizedWeight):
            assert torch.equal(got.values, leaf.values) and torch.equal(got.scale, leaf.scale)
            assert got.dtype == leaf.dtype
        else:
            assert torch.equal(got, leaf)
    tokens = _tokens(tok, cfg, ["a red circle"])
    with torch.no_grad():
        assert torch.equal(
            clip.encode_text(back, tokens, cfg=cfg), clip.encode_text(q, tokens, cfg=cfg)
        )
    with pytest.raises(ValueError, match="not an fmm-int8 file"):
        quant.load_quantized(tmp_path / "fp32.safetensors")
    with pytest.raises(FileNotFoundError, match="no file"):
        quant.load_quantized(tmp_path / "missing.safetensors")


def test_dequantize_restores_plain_float_tensors(tiny):
    _, _, _, params, q = tiny
    back = quant.dequantize(q)
    assert not quant.is_quantized(back)
    for name, leaf in fmm.tree.flatten(back).items():
        ref = fmm.tree.flatten(params)[name]
        assert (
            isinstance(leaf, torch.Tensor) and leaf.shape == ref.shape and leaf.dtype == ref.dtype
        )


def test_bad_arguments_are_refused_with_their_names():
    with pytest.raises(ValueError, match="min_size"):
        quant.quantize({"w": {"weight": torch.ones(4, 4)}}, min_size=0)
    with pytest.raises(TypeError, match="skip"):
        quant.quantize({"w": {"weight": torch.ones(4, 4)}}, skip="codebook")
    with pytest.raises(
        ValueError, match=r"weight must be a float tensor \[out, in\], got torch.float32 \[4\]"
    ):
        quant.quantize_weight(torch.ones(4))
    with pytest.raises(ValueError, match="values must be int8"):
        quant.QuantizedWeight(torch.ones(2, 2), torch.ones(2), dtype=torch.float32)
    with pytest.raises(ValueError, match="scale must be float"):
        quant.QuantizedWeight(
            torch.ones(2, 2, dtype=torch.int8), torch.ones(3), dtype=torch.float32
        )
