"""MDETR: parity with TorchMultimodal's ``MDETRForPhraseGrounding`` on identical random
weights (a ResNet of one bottleneck per stage, a small text encoder and transformer), the
converter's round trip and error list, and the laws of its matched loss."""

import dataclasses
import math

import pytest
import torch

import fmm
import fmm.nn.resnet
from fmm.convert import ConversionError
from fmm.nn.resnet import ResNetConfig
from models.bert.config import BertConfig
from models.family import example_batch
from models.mdetr import (
    FAMILY,
    MDETRConfig,
    apply,
    from_torchmultimodal,
    ground,
    init,
    loss,
    mdetr_tiny,
    sine_positions,
    to_torchmultimodal,
)
from tests.reference import reference

WIDTH, TEXT_WIDTH, QUERIES, CLASSES, ALIGN = 32, 24, 5, 17, 12


def _config(*, contrastive_dim=ALIGN) -> MDETRConfig:
    text = BertConfig(
        vocab_size=50, width=TEXT_WIDTH, layers=2, heads=2, mlp_dim=40, max_positions=34,
        type_vocab_size=1, norm_eps=1e-5, pad_id=1, pooler=False,
    )  # fmt: skip
    return MDETRConfig(
        backbone=ResNetConfig(depths=(1, 1, 1, 1)), text=text, width=WIDTH, heads=2,
        encoder_layers=2, decoder_layers=2, mlp_dim=48, queries=QUERIES, classes=CLASSES,
        contrastive_dim=contrastive_dim, loss_align=1.0 if contrastive_dim else 0.0,
        image_size=96,
    )  # fmt: skip


def _reference_model(*, grounding=True):
    """TorchMultimodal's MDETR from its own modules (``mdetr_resnet101`` fixes the
    backbone's depth, so its parts are built here as that builder builds them), with
    every weight and buffer drawn at random."""
    mdetr = reference("torchmultimodal.models.mdetr.model")
    image = reference("torchmultimodal.models.mdetr.image_encoder")
    text = reference("torchmultimodal.models.mdetr.text_encoder")
    transformer = reference("torchmultimodal.models.mdetr.transformer")
    mlp = reference("torchmultimodal.modules.layers.mlp").MLP
    resnet = reference("torchvision.models.resnet")
    torch.manual_seed(0)
    body = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], norm_layer=image.FrozenBatchNorm2d)
    model = mdetr.MDETR(
        image.MaskedIntermediateLayer(body, "layer4"),
        text.mdetr_roberta_text_encoder(
            embedding_dim=TEXT_WIDTH, vocab_size=50, ffn_dimension=40, num_attention_heads=2,
            num_encoder_layers=2, max_position_embeddings=34,
        ),
        transformer.mdetr_transformer(
            d_model=WIDTH, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
            dim_feedforward=48,
        ),
        image.PositionEmbedding2D(WIDTH // 2, scale=2 * math.pi),
        text.FeatureResizer(TEXT_WIDTH, WIDTH),
        torch.nn.Conv2d(2048, WIDTH, 1),
        torch.nn.Embedding(QUERIES, WIDTH),
        mlp(WIDTH, 4, [WIDTH, WIDTH], dropout=0.0),
        torch.nn.Linear(WIDTH, CLASSES + 1),
    )  # fmt: skip
    if grounding:
        project = (torch.nn.Linear(WIDTH, ALIGN), torch.nn.Linear(WIDTH, ALIGN))
        model = mdetr.MDETRForPhraseGrounding(model, *project)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif value.is_floating_point():
                value.normal_(0, 0.3 if value.ndim > 1 else 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def reference_model():
    return _reference_model()


def _inputs():
    """Two images and two texts of different sizes, as lists (the reference) and padded
    with masks (ours)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 96, 80, generator=g), torch.randn(3, 64, 96, generator=g)]
    texts = [torch.tensor([0, 5, 9, 7, 2]), torch.tensor([0, 11, 2])]
    padded = torch.zeros(2, 3, 96, 96)
    mask = torch.zeros(2, 96, 96, dtype=torch.bool)
    for i, im in enumerate(images):
        padded[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = True
    tokens = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True, padding_value=1)
    return (images, texts), (padded, tokens, mask)


def test_apply_equals_torchmultimodal_on_identical_weights(reference_model):
    cfg = _config()
    params = from_torchmultimodal(reference_model.state_dict(), cfg)
    (images, texts), (padded, tokens, mask) = _inputs()
    with torch.no_grad():
        want = reference_model(images, texts)
    got = apply(params, padded, tokens, cfg=cfg, image_mask=mask)
    model_out, embeddings = want.model_output, want.contrastive_embeddings
    torch.testing.assert_close(got["logits"], model_out.pred_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["boxes"], model_out.pred_boxes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        got["query_embed"], embeddings.query_embeddings, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        got["token_embed"], embeddings.token_embeddings, atol=1e-5, rtol=1e-5
    )


def _reference_matching(pred_logits, pred_boxes, targets, target_boxes, cfg):
    """MDETR's matcher written with torchvision's box ops and scipy's assignment."""
    ops, optimize = reference("torchvision.ops"), reference("scipy.optimize")
    indices = []
    for b in range(pred_logits.shape[0]):
        prob, boxes = pred_logits[b].softmax(-1), pred_boxes[b]
        xyxy = (ops.box_convert(x, "cxcywh", "xyxy") for x in (boxes, target_boxes[b]))
        cost = (
            -cfg.cost_class * prob @ targets[b].T
            + cfg.cost_bbox * torch.cdist(boxes, target_boxes[b], p=1)
            - cfg.cost_giou * ops.generalized_box_iou(*xyxy)
        )
        rows, cols = optimize.linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return indices


def test_the_loss_equals_torchmultimodals_losses_under_the_reference_matching(reference_model):
    tmm = reference("torchmultimodal.modules.losses.mdetr")
    cfg = _config()
    params = from_torchmultimodal(reference_model.state_dict(), cfg)
    (images, texts), (padded, tokens, mask) = _inputs()
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]], [[0.5, 0.5, 0.4, 0.4]] * 2])
    token_map = torch.zeros(2, 2, tokens.shape[1], dtype=torch.bool)
    token_map[0, 0, 1:3], token_map[0, 1, 3], token_map[1, 0, 1] = True, True, True
    valid = torch.tensor([[True, True], [True, False]])
    batch = {"images": padded, "image_mask": mask, "tokens": tokens, "boxes": boxes}
    batch |= {"token_map": token_map, "box_valid": valid}
    _, metrics = loss(params, batch, cfg=cfg, train=False)
    with torch.no_grad():
        out = reference_model(images, texts).model_output
    positive = torch.nn.functional.pad(token_map.float(), (0, CLASSES + 1 - tokens.shape[1]))
    positive = positive / positive.sum(-1, keepdim=True).clamp(min=1)
    real = [boxes[b][valid[b]] for b in range(2)]
    indices = _reference_matching(
        out.pred_logits, out.pred_boxes, [positive[b][valid[b]] for b in range(2)], real, cfg
    )
    n = int(valid.sum())
    want_ce = tmm.soft_token_prediction_loss(
        out.pred_logits, [len(r) for r in real], positive[valid], indices, n
    )
    want_box = tmm.box_losses(out.pred_boxes, real, indices, n)
    torch.testing.assert_close(metrics["class"], want_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["bbox"], want_box.l1_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["giou"], want_box.giou_loss, atol=1e-5, rtol=1e-5)


def test_sine_positions_equal_detrs_position_embedding():
    image = reference("torchmultimodal.models.mdetr.image_encoder")
    pad = torch.zeros(2, 5, 7, dtype=torch.bool)
    pad[0, 3:], pad[1, :, 4:] = True, True
    want = image.PositionEmbedding2D(8, scale=2 * math.pi)(pad)  # [B, 16, H, W]
    got = sine_positions(~pad, 16, temperature=10000.0, scale=2 * math.pi)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2))


def test_the_converter_round_trips_exactly(reference_model):
    cfg = _config()
    state = reference_model.state_dict()
    back = to_torchmultimodal(from_torchmultimodal(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_the_bare_mdetr_layout_converts_without_the_alignment_head():
    cfg = _config(contrastive_dim=None)
    state = _reference_model(grounding=False).state_dict()
    params = from_torchmultimodal(state, cfg)
    assert "align_image" not in params
    assert to_torchmultimodal(params, cfg).keys() == state.keys()


def test_the_converter_lists_every_bad_key_at_once(reference_model):
    state = dict(reference_model.state_dict())
    del state["model.query_embed.weight"]
    state["model.extra.weight"] = torch.zeros(1)
    cross = "model.transformer.decoder.layers.1.cross_attn_image.in_proj_weight"
    state[cross] = torch.zeros(3 * WIDTH, WIDTH + 1)
    with pytest.raises(ConversionError) as err:
        from_torchmultimodal(state, _config())
    message = str(err.value)
    assert "missing: model.query_embed.weight" in message
    assert "unexpected: model.extra.weight" in message
    assert f"mismatched {cross}[q]" in message and f"mismatched {cross}[kv]" in message


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(mdetr_tiny(), dropout=0.0)
    params = init(cfg, fmm.random.key(0))
    batch = example_batch(FAMILY.batch(cfg), fmm.random.key(1), size=32)
    keys = fmm.random.split(fmm.random.key(2), 2)
    batch["boxes"] = torch.cat(
        (fmm.random.uniform(keys[0], (3, 4, 2)) * 0.6 + 0.2,
         fmm.random.uniform(keys[1], (3, 4, 2)) * 0.3 + 0.05), dim=-1,
    )  # fmt: skip
    seq = batch["tokens"].shape[1]
    batch["token_map"] = torch.eye(4, seq, dtype=torch.bool).expand(3, 4, seq).clone()
    return cfg, params, batch


def test_the_loss_does_not_depend_on_the_order_of_the_targets(tiny):
    cfg, params, batch = tiny
    value, _ = loss(params, batch, cfg=cfg, train=False)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = {**batch, "boxes": batch["boxes"][:, perm], "token_map": batch["token_map"][:, perm]}
    torch.testing.assert_close(loss(params, shuffled, cfg=cfg, train=False)[0], value)


def test_padding_targets_change_nothing(tiny):
    cfg, params, batch = tiny
    three = {"images": batch["images"], "tokens": batch["tokens"]}
    three |= {"boxes": batch["boxes"][:, :3], "token_map": batch["token_map"][:, :3]}
    padded = {**batch, "box_valid": torch.tensor([True, True, True, False]).expand(3, 4)}
    torch.testing.assert_close(
        loss(params, padded, cfg=cfg, train=False)[0], loss(params, three, cfg=cfg, train=False)[0]
    )


def test_frozen_batch_norms_and_stem_take_no_gradient_and_the_rest_does(tiny):
    cfg, params, batch = tiny
    flat = fmm.tree.flatten(params)
    live = {k: v.detach().requires_grad_(True) for k, v in flat.items()}
    value, _ = loss(fmm.tree.unflatten(live), batch, cfg=cfg, train=False)
    grads = dict(zip(live, torch.autograd.grad(value, list(live.values()), allow_unused=True)))
    for name, grad in grads.items():
        frozen = (
            ".bn" in name
            or "downsample.bn" in name
            or name.startswith(("backbone.conv1", "backbone.layer1"))
        )
        if frozen:
            assert grad is None, name
        elif name.startswith(("backbone.layer4", "class_head", "box_head", "query", "align")):
            assert grad is not None and grad.abs().sum() > 0, name


def test_apply_names_the_bad_argument(tiny):
    cfg, params, batch = tiny
    with pytest.raises(ValueError, match="images"):
        apply(params, batch["images"][:, :2], batch["tokens"], cfg=cfg)
    with pytest.raises(ValueError, match="tokens"):
        apply(params, batch["images"], batch["tokens"].clamp(max=0) + 64, cfg=cfg)
    with pytest.raises(ValueError, match="image_mask"):
        apply(
            params,
            batch["images"],
            batch["tokens"],
            cfg=cfg,
            image_mask=torch.ones(3, 5, 5, dtype=torch.bool),
        )


@pytest.mark.parametrize("depths", [(3, 4, 6, 3), (3, 4, 23, 3)], ids=["resnet50", "resnet101"])
def test_the_backbone_has_torchvisions_resnet_shapes(depths):
    resnet = reference("torchvision.models.resnet")
    with torch.device("meta"):
        body = resnet.ResNet(resnet.Bottleneck, list(depths))
    want = {
        k.replace("downsample.0", "downsample.conv").replace(
            "downsample.1", "downsample.bn"
        ): v.shape
        for k, v in body.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    params = fmm.nn.resnet.init_resnet(ResNetConfig(depths=depths), fmm.random.key(0).to("meta"))
    assert {k: v.shape for k, v in fmm.tree.flatten(params).items()} == want


def test_the_backbone_strides_by_32_rounding_up():
    cfg = ResNetConfig(depths=(1, 1, 1, 1), width=4)
    params = fmm.nn.resnet.init_resnet(cfg, fmm.random.key(0))
    out = fmm.nn.resnet.resnet(params, torch.rand(2, 3, 65, 96), cfg=cfg)
    assert out.shape == (2, cfg.channels, 3, 3)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_adds_pos_to_queries_and_keys_but_not_values(cross):
    """``fmm.nn.attention``'s ``pos=`` / ``context_pos=``, which DETR's layers use, against
    ``nn.MultiheadAttention`` given ``query=x+pos, key=context+context_pos, value=context``."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x, pos, ctx, ctx_pos = (torch.randn(2, n, 8) for n in (3, 3, 5, 5))
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    out = {"weight": mha.out_proj.weight.detach(), "bias": mha.out_proj.bias.detach()}
    if cross:
        cfg = fmm.nn.AttentionConfig(dim=8, heads=2, kv_dim=8)
        params = {"q": {"weight": w[:8], "bias": b[:8]}, "kv": {"weight": w[8:], "bias": b[8:]}}
        got = fmm.nn.attention(
            {**params, "out": out}, x, cfg=cfg, context=ctx, pos=pos, context_pos=ctx_pos
        )
        want = mha(x + pos, ctx + ctx_pos, ctx, need_weights=False)[0]
    else:
        cfg = fmm.nn.AttentionConfig(dim=8, heads=2)
        got = fmm.nn.attention({"qkv": {"weight": w, "bias": b}, "out": out}, x, cfg=cfg, pos=pos)
        want = mha(x + pos, x + pos, x, need_weights=False)[0]
    torch.testing.assert_close(got, want.detach())


def test_aux_loss_adds_each_earlier_decoder_layers_matched_loss(tiny):
    cfg, _, batch = tiny
    two = dataclasses.replace(cfg, decoder_layers=2)
    p2 = init(two, fmm.random.key(0))
    plain, metrics = loss(p2, batch, cfg=two, train=False)
    with_aux, aux_metrics = loss(
        p2, batch, cfg=dataclasses.replace(two, aux_loss=True), train=False
    )
    assert with_aux > plain and metrics.keys() == aux_metrics.keys()
    assert all(torch.equal(metrics[k], aux_metrics[k]) for k in metrics)  # the last layer's


def test_ground_picks_the_query_whose_tokens_are_the_phrase():
    logits = torch.zeros(1, 4, 9)
    logits[0, 2, 1:3] = 10.0  # query 2 names tokens 1 and 2
    logits[0, 0, 5] = 10.0  # query 0 names token 5
    boxes = torch.rand(1, 4, 4)
    phrases = torch.zeros(1, 2, 6, dtype=torch.bool)
    phrases[0, 0, 1:3], phrases[0, 1, 5] = True, True
    got, scores = ground({"logits": logits, "boxes": boxes}, phrases)
    torch.testing.assert_close(got, boxes[:, [2, 0]])
    assert (scores > 0.9).all()
    with pytest.raises(ValueError, match="phrase_map"):
        ground({"logits": logits, "boxes": boxes}, torch.zeros(1, 2, 12, dtype=torch.bool))
