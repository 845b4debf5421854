"""Laws of fmm.fusion: insertion-order invariance, deep-set symmetry, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm import fusion
from fmm.nn.transformer import TransformerConfig

DIMS = {"text": 5, "image": 3, "audio": 7}


def _features(dims, batch, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, d, generator=g) for n, d in dims.items()}


def _layers():
    """(name, params, apply) of every mapping-taking fusion over DIMS."""
    k = fmm.random.key(0)
    cc = fusion.ConcatConfig(dims=DIMS)
    aw = fusion.AttentionWeightedConfig(dims=DIMS, dim=6)
    out = [
        ("concat", {}, lambda p, f: fusion.concat(p, f, cfg=cc)),
        (
            "attention_weighted",
            fusion.init_attention_weighted(aw, k),
            lambda p, f: fusion.attention_weighted(p, f, cfg=aw),
        ),
    ]
    for pooling in fusion.POOLINGS:
        for attention in (False, True):
            ds = fusion.DeepSetConfig(
                dims=DIMS,
                dim=6,
                hidden=9,
                out_dim=4,
                attention=attention,
                norm_p=2.0,
                pooling=pooling,
            )
            out.append(
                (
                    f"deepset-{pooling}-{attention}",
                    fusion.init_deepset(ds, k),
                    lambda p, f, ds=ds: fusion.deepset(p, f, cfg=ds),
                )
            )
    return out


LAYERS = _layers()


@given(order=st.permutations(sorted(DIMS)), batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_every_fusion_ignores_the_mappings_insertion_order(order, batch, seed):
    feats = _features(DIMS, batch, seed)
    shuffled = {n: feats[n] for n in order}
    for name, params, apply in LAYERS:
        torch.testing.assert_close(apply(params, shuffled), apply(params, feats), msg=name)


@given(perm=st.permutations(["a", "b", "c"]), seed=st.integers(0, 99))
def test_deepset_is_invariant_to_permuting_modalities_with_their_projections(perm, seed):
    # Renaming the modalities (each keeps its features and its projection) permutes the
    # set's members; a deep set's pooled output must not change.
    for pooling in fusion.POOLINGS:
        cfg = fusion.DeepSetConfig(
            dims={"a": 4, "b": 4, "c": 4},
            dim=5,
            hidden=7,
            out_dim=3,
            attention=True,
            pooling=pooling,
        )
        params = fusion.init_deepset(cfg, fmm.random.key(1))
        feats = _features({"a": 4, "b": 4, "c": 4}, 3, seed)
        rename = dict(zip(["a", "b", "c"], perm))
        renamed_params = {**params, "proj": {rename[n]: p for n, p in params["proj"].items()}}
        renamed_feats = {rename[n]: x for n, x in feats.items()}
        torch.testing.assert_close(
            fusion.deepset(renamed_params, renamed_feats, cfg=cfg),
            fusion.deepset(params, feats, cfg=cfg),
        )


def test_concat_puts_blocks_in_sorted_name_order():
    feats = _features(DIMS, 2, 0)
    out = fusion.concat({}, feats, cfg=fusion.ConcatConfig(dims=DIMS))
    torch.testing.assert_close(out, torch.cat([feats["audio"], feats["image"], feats["text"]], -1))


def test_output_shapes():
    feats = _features(DIMS, 5, 0)
    want = {"concat": 15, "attention_weighted": 6}
    for name, params, apply in LAYERS:
        assert apply(params, feats).shape == (5, want.get(name, 4)), name


def test_attention_weighted_weights_are_a_distribution_and_mix_the_projections():
    cfg = fusion.AttentionWeightedConfig(dims=DIMS, dim=6)
    params = fusion.init_attention_weighted(cfg, fmm.random.key(2))
    feats = _features(DIMS, 4, 1)
    w = fusion.modality_weights(params, feats, cfg=cfg)
    torch.testing.assert_close(w.sum(-1), torch.ones(4))
    proj = [fmm.nn.linear(params["proj"][n], feats[n]) for n in sorted(DIMS)]
    manual = sum(w[:, i : i + 1] * h for i, h in enumerate(proj))
    torch.testing.assert_close(fusion.attention_weighted(params, feats, cfg=cfg), manual)


def test_deepset_mean_pooling_without_attention_equals_the_hand_written_formula():
    cfg = fusion.DeepSetConfig(dims=DIMS, dim=6, hidden=9, out_dim=4, pooling="mean", norm_p=1.0)
    params = fusion.init_deepset(cfg, fmm.random.key(3))
    feats = _features(DIMS, 3, 2)
    h = [fmm.nn.linear(params["proj"][n], feats[n]) for n in DIMS]
    pooled = sum(x / x.abs().sum(-1, keepdim=True) for x in h) / 3
    torch.testing.assert_close(
        fusion.deepset(params, feats, cfg=cfg), fmm.nn.mlp(params["mlp"], pooled, act="relu")
    )


@pytest.mark.parametrize("index", range(len(LAYERS)), ids=[n for n, _, _ in LAYERS])
def test_gradients_reach_every_modality(index):
    name, params, apply = LAYERS[index]
    feats = {n: x.requires_grad_() for n, x in _features(DIMS, 3, 0).items()}
    apply(params, feats).square().sum().backward()
    for n, x in feats.items():
        assert x.grad is not None and x.grad.abs().sum() > 0, (name, n)


def test_cross_attention_fusion_matches_the_transformer_and_depends_on_context():
    tc = TransformerConfig(width=8, layers=2, heads=2, cross_dim=6)
    cfg = fusion.CrossAttentionFusionConfig(transformer=tc)
    params = fusion.init_cross_attention_fusion(cfg, fmm.random.key(4))
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6).requires_grad_()
    out = fusion.cross_attention_fusion(params, x, ctx, cfg=cfg)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out, fmm.nn.transformer(params, x, cfg=tc, context=ctx))
    out.sum().backward()
    assert ctx.grad.abs().sum() > 0


def test_cross_attention_fusion_runs_every_block_through_block_fn_with_its_context():
    tc = TransformerConfig(width=8, layers=3, heads=2, cross_dim=6, norm_first=False)
    cfg = fusion.CrossAttentionFusionConfig(transformer=tc)
    params = fusion.init_cross_attention_fusion(cfg, fmm.random.key(5))
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    seen = []

    def block_fn(block_params, h, **kwargs):
        seen.append((id(block_params), kwargs["context"] is ctx))
        return fmm.nn.block(block_params, h, **kwargs)

    out = fusion.cross_attention_fusion(params, x, ctx, cfg=cfg, block_fn=block_fn)
    assert seen == [(id(b), True) for b in params["blocks"]]
    torch.testing.assert_close(out, fusion.cross_attention_fusion(params, x, ctx, cfg=cfg))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ({"text": torch.randn(2, 5), "image": torch.randn(2, 3)}, r"missing \['audio'\]"),
        ({**_features(DIMS, 2, 0), "video": torch.randn(2, 1)}, r"extra \['video'\]"),
        ({**_features(DIMS, 2, 0), "image": torch.randn(2, 4)}, r"'image' has shape \[2, 4\]"),
        ({**_features(DIMS, 2, 0), "text": torch.randn(3, 5)}, r"'text' has batch 3"),
        ({**_features(DIMS, 2, 0), "audio": torch.randn(2, 1, 7)}, r"'audio' has shape"),
    ],
)
def test_bad_modalities_are_errors_naming_the_modality(features, match):
    for _name, params, apply in LAYERS:
        with pytest.raises(ValueError, match=match):
            apply(params, features)


def test_bad_configs_and_cross_attention_inputs_are_errors():
    with pytest.raises(ValueError, match="pooling"):
        fusion.DeepSetConfig(dims=DIMS, dim=2, hidden=2, out_dim=2, pooling="median")
    with pytest.raises(ValueError, match=r"dims\['x'\]"):
        fusion.ConcatConfig(dims={"x": 0})
    with pytest.raises(ValueError, match="at least one"):
        fusion.ConcatConfig(dims={})
    with pytest.raises(ValueError, match="cross_dim"):
        fusion.CrossAttentionFusionConfig(transformer=TransformerConfig(width=4, layers=1, heads=1))
    cfg = fusion.CrossAttentionFusionConfig(
        transformer=TransformerConfig(width=4, layers=1, heads=1, cross_dim=3)
    )
    p = fusion.init_cross_attention_fusion(cfg, fmm.random.key(0))
    with pytest.raises(ValueError, match=r"context has shape \[2, 5, 4\]"):
        fusion.cross_attention_fusion(p, torch.randn(2, 3, 4), torch.randn(2, 5, 4), cfg=cfg)
    with pytest.raises(ValueError, match="different batch"):
        fusion.cross_attention_fusion(p, torch.randn(2, 3, 4), torch.randn(1, 5, 3), cfg=cfg)


def test_docs_fusion_snippets_run():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[2] / "docs" / "fusion.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    for block in blocks:
        exec(compile(block, "docs/fusion.md", "exec"), {})
