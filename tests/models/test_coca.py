"""CoCa: parity with TorchMultimodal's ``CoCaModel`` and open_clip's ``CoCa`` on identical
random weights (embeddings, captioning logits, loss, greedy captions), cached decoding
against the full forward, and the converters' round trips and error lists."""

import pytest
import torch

import fmm
import models.coca as coca
from fmm.convert import ConversionError
from tests.reference import reference

TOL = dict(atol=1e-5, rtol=1e-5)
SOT, EOS = 1, 2


def _tiny(**kw):
    # Odd sizes catch transposed weights; 3 text positions of padding exercise the masks.
    sizes = dict(
        image_size=16, patch_size=4, image_width=24, image_heads=2, image_layers=2,
        text_width=20, embed_dim=20, text_heads=2, text_layers=2, decoder_layers=2,
        decoder_heads=2, pool_heads=2, caption_queries=5, vocab_size=37, context_length=11,
        image_mlp_dim=40, text_mlp_dim=36, decoder_mlp_dim=44,
    )  # fmt: skip
    return coca.coca_tiny(**{**sizes, **kw})


def _randomise(module: torch.nn.Module, seed: int) -> None:
    # The references zero their biases and set norms to 1: random values everywhere make
    # every weight count.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if p.dim() == 0:  # the temperature
                p.fill_(2.0)


def _data(cfg, batch=3, pad=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, *cfg.image_shape, generator=g)
    tokens = torch.randint(3, cfg.vocab_size, (batch, cfg.context_length), generator=g)
    tokens[0, -pad:] = cfg.pad_id  # one padded caption
    return images, tokens


# --------------------------------------------------------------------------- TorchMultimodal


def _tmm_model(cfg):
    m = reference("torchmultimodal.models.coca.coca_model")
    model = m.coca_vit(
        vision_patch_size=cfg.patch_size, vision_dim_feedforward=cfg.image_tower.transformer.hidden,
        vision_n_layer=cfg.image_layers, vision_n_head=cfg.image_heads,
        vocab_size=cfg.vocab_size, num_text_positions=cfg.context_length,
        text_hidden_dim=cfg.text_width, text_n_layer=cfg.text_layers,
        text_n_head=cfg.text_heads, text_dim_feedforward=cfg.text_tower.transformer.hidden,
        text_output_dim=cfg.embed_dim, fusion_n_layer=cfg.decoder_layers,
        fusion_n_head=cfg.decoder_heads, fusion_dim_feedforward=cfg.decoder_blocks[0].hidden,
        multimodal_output_projection_dim=cfg.vocab_size, pooler_input_embed_dim=cfg.image_width,
        pooler_output_embed_dim=cfg.text_width, pooler_n_head=cfg.pool_heads,
        image_size=cfg.image_size, pooler_n_queries=cfg.caption_queries,
        cascaded_pooler=cfg.pooler == "cascade", pad_idx=cfg.pad_id,
    )  # fmt: skip
    pretraining = m.CoCaForPretraining(model, pad_idx=cfg.pad_id).eval()
    _randomise(pretraining, 0)
    return pretraining


@pytest.fixture(scope="module", params=["cascade", "parallel"])
def tmm(request):
    cfg = _tiny(pooler=request.param)
    ref = _tmm_model(cfg)
    return cfg, ref, coca.from_torchmultimodal(ref.state_dict(), cfg)


def test_torchmultimodal_parity_embeddings_logits_and_loss(tmm):
    cfg, ref, params = tmm
    images, tokens = _data(cfg)
    with torch.no_grad():
        want = ref.model(images, tokens)
        # The cascade's contrastive pooler keeps its query axis ([B, 1, E]), which
        # CoCaForPretraining.forward passes on to a loss wanting [B, E]: its own loss
        # modules are called here on the squeezed embeddings instead.
        image_embeds = want.image_pooled_output.reshape(len(images), -1)
        contrastive = ref.contrastive_loss(image_embeds, want.text_pooled_output)
        caption = ref.caption_loss(
            want.multimodal_embeddings.flatten(0, 1), tokens[:, 1:].flatten()
        )
    got = coca.apply(params, images, tokens[:, :-1], cfg=cfg)
    torch.testing.assert_close(got.image_embeds, image_embeds, **TOL)
    torch.testing.assert_close(got.text_embeds, want.text_pooled_output, **TOL)
    torch.testing.assert_close(got.logits, want.multimodal_embeddings, **TOL)
    _, metrics = coca.loss(params, {"images": images, "tokens": tokens}, cfg=cfg)
    torch.testing.assert_close(metrics["contrastive"], contrastive, **TOL)
    torch.testing.assert_close(metrics["caption"], caption, **TOL)


def test_torchmultimodal_greedy_captions_equal_step_by_step_full_forward(tmm):
    # TorchMultimodal has no generate: its full forward, rerun on the growing caption,
    # padded to the fixed text length it requires, is the reference.
    cfg, ref, params = tmm
    images, _ = _data(cfg)
    steps = 5
    seq = torch.full((len(images), 1), SOT)
    with torch.no_grad():
        for _ in range(steps):
            padded = torch.nn.functional.pad(seq, (0, cfg.context_length - seq.shape[1]))
            logits = ref.model(images, padded).multimodal_embeddings[:, seq.shape[1] - 1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    got = coca.generate_captions(params, images, cfg=cfg, sot_id=SOT, max_new_tokens=steps)
    assert torch.equal(got.tokens, seq[:, 1:])


def test_torchmultimodal_round_trip_and_bare_model(tmm):
    cfg, ref, params = tmm
    sd = coca.to_torchmultimodal(params, cfg)
    want = ref.model.state_dict()
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], want[k]) for k in sd)
    bare = coca.from_torchmultimodal(want, cfg)  # a CoCaModel holds no temperature
    assert float(bare["logit_scale"]) == pytest.approx(cfg.init_logit_scale)


def test_torchmultimodal_error_lists_every_bad_key(tmm):
    cfg, ref, _ = tmm
    sd = dict(ref.model.state_dict())
    del sd["vision_proj.weight"]
    sd["text_decoder.ln_final.weight"] = torch.zeros(3)
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as e:
        coca.from_torchmultimodal(sd, cfg)
    for part in ("missing: vision_proj.weight", "unexpected: extra.weight",
                 "mismatched text_decoder.ln_final.weight"):  # fmt: skip
        assert part in str(e.value)


# --------------------------------------------------------------------------- open_clip


def _oc_model(cfg):
    CoCa = reference("open_clip.coca_model").CoCa
    text = dict(context_length=cfg.context_length - 1, vocab_size=cfg.vocab_size,
                width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                embed_cls=True, output_tokens=True, pad_id=cfg.pad_id)  # fmt: skip
    model = CoCa(
        embed_dim=cfg.embed_dim,
        multimodal_cfg=dict(
            context_length=cfg.context_length - 1, vocab_size=cfg.vocab_size,
            width=cfg.text_width, heads=cfg.decoder_heads, layers=cfg.decoder_layers,
        ),
        text_cfg=text,
        vision_cfg=dict(
            image_size=cfg.image_size, layers=cfg.image_layers, width=cfg.image_width,
            head_width=cfg.image_width // cfg.image_heads, patch_size=cfg.patch_size,
            attentional_pool=True, attn_pooler_heads=cfg.pool_heads,
            attn_pooler_queries=cfg.caption_queries + 1, output_tokens=True,
        ),
        pad_id=cfg.pad_id,
    ).eval()  # fmt: skip
    _randomise(model, 1)
    return model


@pytest.fixture(scope="module")
def oc():
    # open_clip's MLPs are 4x wide.
    cfg = coca.open_clip_style(_tiny(image_mlp_dim=96, text_mlp_dim=80, decoder_mlp_dim=80))
    ref = _oc_model(cfg)
    return cfg, ref, coca.from_open_clip(ref.state_dict(), cfg)


def test_open_clip_parity_embeddings_logits_and_loss(oc):
    cfg, ref, params = oc
    images, tokens = _data(cfg)
    text = tokens[:, :-1]  # open_clip reads context_length - 1 tokens, the class token after
    loss_fn = reference("open_clip.loss").CoCaLoss(
        caption_loss_weight=cfg.caption_weight, clip_loss_weight=cfg.contrastive_weight,
        pad_id=cfg.pad_id,
    )  # fmt: skip
    with torch.no_grad():
        out = ref(images, text)
        clip_part, caption_part = loss_fn(
            out["image_features"], out["text_features"], out["logits"], out["labels"],
            out["logit_scale"],
        )  # fmt: skip
        full = ref(images[1:], text[1:], output_labels=False)["logits"]
    torch.testing.assert_close(
        coca.encode_image(params, images, cfg=cfg), out["image_features"], **TOL
    )
    torch.testing.assert_close(coca.encode_text(params, text, cfg=cfg), out["text_features"], **TOL)
    # Unpadded rows: open_clip 3's key mask reaches padding queries too, whose logits no
    # loss reads (see models.coca.model._cls_mask).
    logits = coca.caption_logits(params, images[1:], text[1:], cfg=cfg)
    torch.testing.assert_close(logits, full, **TOL)
    # Our loss predicts every token after the first; a padding column makes the extra
    # label one the loss ignores, as open_clip's captions stop one short.
    batch = {
        "images": images,
        "tokens": torch.cat([text, torch.full_like(text[:, :1], cfg.pad_id)], 1),
    }
    value, _ = coca.loss(params, batch, cfg=cfg)
    torch.testing.assert_close(value, clip_part + caption_part, **TOL)


def test_open_clip_greedy_captions_equal_its_generation_loop(oc):
    # open_clip's CoCa.generate needs transformers' BeamSearchScorer, which transformers 5
    # no longer has, so its greedy loop is run here as generate runs it (top_k=1): the full
    # forward on the growing caption, the image encoded once, the last position's argmax.
    cfg, ref, params = oc
    images, _ = _data(cfg)
    steps = cfg.context_length - 2
    seq = torch.full((len(images), 1), SOT)
    with torch.no_grad():
        latent, embs = ref._encode_image(images)
        for _ in range(steps):
            out = ref(images, seq, image_latent=latent, image_embs=embs, output_labels=False)
            seq = torch.cat([seq, out["logits"][:, -1].argmax(-1, keepdim=True)], dim=1)
    got = coca.generate_captions(params, images, cfg=cfg, sot_id=SOT, max_new_tokens=steps)
    assert torch.equal(got.tokens, seq[:, 1:])


def test_open_clip_round_trip(oc):
    cfg, ref, params = oc
    sd, want = coca.to_open_clip(params, cfg), ref.state_dict()
    assert sd.keys() == want.keys()
    assert all(torch.equal(sd[k], want[k]) for k in sd)


def test_open_clip_packs_the_pooler_when_text_and_image_widths_are_equal():
    # nn.MultiheadAttention keeps one in_proj_weight when kdim equals its width (as the
    # benchmark's "small" size has), three projections otherwise (the fixture above).
    cfg = coca.open_clip_style(
        _tiny(image_width=20, image_mlp_dim=80, text_mlp_dim=80, decoder_mlp_dim=80)
    )
    ref = _oc_model(cfg)
    params = coca.from_open_clip(ref.state_dict(), cfg)
    sd = coca.to_open_clip(params, cfg)
    assert "visual.attn_pool.attn.in_proj_weight" in sd
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    images, tokens = _data(cfg)
    with torch.no_grad():
        want = ref(images, tokens[:, :-1])["image_features"]
    torch.testing.assert_close(coca.encode_image(params, images, cfg=cfg), want, **TOL)


def test_converters_refuse_the_other_layout():
    with pytest.raises(ValueError, match="open_clip_style"):
        coca.from_open_clip({}, coca.coca_tiny())
    with pytest.raises(ValueError, match="decoder must be 'fused'"):
        coca.to_torchmultimodal({}, coca.open_clip_style(coca.coca_tiny()))


# --------------------------------------------------------------------------- laws


@pytest.mark.parametrize("layout", ["torchmultimodal", "open_clip"])
def test_cached_decoding_equals_full_forward(layout):
    cfg = (
        coca.coca_tiny() if layout == "torchmultimodal" else coca.open_clip_style(coca.coca_tiny())
    )
    params = coca.init(cfg, fmm.random.key(3))
    images, tokens = _data(cfg, seed=1)
    prompt = tokens[:, :4]
    spec = coca.decoder_spec(cfg)
    queries = coca.image_queries(params, images, cfg=cfg)
    cache = fmm.decoding.init_cache(spec, 3, 8, context_len=queries.shape[1])
    logits, cache = fmm.decoding.prefill(params, prompt, cache, cfg=spec, context=queries)
    steps = [logits]
    for t in range(4, 8):
        step, cache = fmm.decoding.decode_step(params, tokens[:, t], cache, cfg=spec)
        steps.append(step[:, None])
    full = coca.caption_logits(params, images, tokens[:, :8], cfg=cfg)
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_bad_input_names_the_argument():
    cfg = coca.coca_tiny()
    params = coca.init(cfg, fmm.random.key(0))
    with pytest.raises(ValueError, match="tokens"):
        coca.encode_text(params, torch.zeros(2, cfg.context_length, dtype=torch.int64), cfg=cfg)
    with pytest.raises(ValueError, match="images"):
        coca.encode_image(params, torch.zeros(2, 3, 8, 8), cfg=cfg)


def test_the_stack_configs_are_checked_at_construction():
    with pytest.raises(ValueError, match="cross_only and norm_context need cross_dim"):
        fmm.nn.TransformerConfig(width=8, layers=1, heads=2, cross_only=True)
    one = fmm.nn.TransformerConfig(width=8, layers=1, heads=2)
    wide = fmm.nn.TransformerConfig(width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="differ in width"):
        fmm.decoding.DecoderSpec(transformer=(one, wide), embed=None, head=None)
    stack = fmm.nn.init_transformer(one, fmm.random.key(0))
    with pytest.raises(ValueError, match="1 block configs but the stack has 2"):
        fmm.nn.transformer({"blocks": stack["blocks"] * 2}, torch.zeros(1, 3, 8), cfg=(one,))


def test_a_cross_only_layer_caches_no_self_attention_keys():
    cfg = coca.open_clip_style(coca.coca_tiny())
    cache = fmm.decoding.init_cache(coca.decoder_spec(cfg), 2, 5, context_len=3)
    kinds = [sorted(layer) for layer in cache["layers"]]
    uni, plain, cross = ["k", "v"], ["k", "v"], ["ck", "cv"]
    assert kinds == [uni] * cfg.text_layers + [plain, cross] * cfg.decoder_layers
