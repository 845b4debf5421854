"""ALBEF against TorchMultimodal: its encoders on identical random weights (the momentum
encoders through our pure update), state dicts (with and without the similarity queues)
converted both ways exactly, and one error that lists every bad key."""

import pytest
import torch

import fmm
from fmm.convert import ConversionError
from models import albef as A
from models.albef import convert as C
from tests.models.test_albef import CFG, HEADS, MLP, VOCAB, W, inputs

META = fmm.random.key(0).to("meta")


def _tmm_model(dropout: float):
    from tests.reference import reference

    ie = reference("torchmultimodal.models.albef.image_encoder")
    me = reference("torchmultimodal.models.albef.multimodal_encoder")
    bt = reference("torchmultimodal.modules.encoders.bert_text_encoder")
    mm = reference("torchmultimodal.models.albef.model")
    torch.manual_seed(0)
    model = mm.ALBEFModel(
        ie.ALBEFVisionEncoder(
            image_size=20, patch_size=5, num_hidden_layers=2, num_attention_heads=HEADS,
            hidden_size=W, mlp_dim=MLP,
        ),
        bt.bert_text_encoder(
            hidden_size=W, num_hidden_layers=2, num_attention_heads=HEADS,
            intermediate_size=MLP, vocab_size=VOCAB, max_position_embeddings=16, dropout=dropout,
        ),
        me.ALBEFMultimodalEncoder(
            hidden_size=W, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=MLP
        ),
    )  # fmt: skip
    with torch.no_grad():  # random weights everywhere, norms included, so nothing hides
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval(), mm


@pytest.fixture(scope="module")
def tmm():
    return _tmm_model(dropout=0.1)


def test_encoders_match_torchmultimodal_albef_on_identical_random_weights(tmm):
    model, _ = tmm
    parts = C.from_torchmultimodal(model.state_dict(), CFG)
    params = {**A.init(CFG, fmm.random.key(1)), **parts["params"]}
    images, ids, mask = inputs()
    with torch.no_grad():
        want = model(images, ids, mask)
    got = A.apply(params, images, ids, cfg=CFG, attention_mask=mask)
    # TorchMultimodal steps its momentum encoders inside forward; ours is the pure update.
    momentum = A.momentum_update(parts["momentum"], params, m=0.995)
    got_m = A.apply(momentum, images, ids, cfg=CFG, attention_mask=mask)
    real = mask.bool()  # padded positions are computed but meaningless on both sides
    for ours, theirs in ((got, ""), (got_m, "_m")):
        torch.testing.assert_close(
            ours["image"], getattr(want, f"image_embeddings{theirs}"), atol=1e-5, rtol=0
        )
        for name, field in (("text", "text_embeddings"), ("fused", "multimodal_embeddings")):
            torch.testing.assert_close(
                ours[name][real], getattr(want, field + theirs)[real], atol=1e-5, rtol=0
            )


def test_state_dict_round_trips_exactly_with_and_without_similarity(tmm):
    model, mm = tmm
    sd = model.state_dict()
    parts = C.from_torchmultimodal(sd, CFG)
    back = C.to_torchmultimodal(
        {**A.init(CFG, META), **parts["params"]}, CFG, momentum=parts["momentum"], text_mlp_out=3
    )
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k

    sim = mm.ALBEFModelWithSimilarity(
        model, torch.nn.Linear(W, 8), torch.nn.Linear(W, 8), embed_size=8, queue_size=12
    )
    sim.queue_ptr[0] = 5
    sim.idx_queue[0, :5] = torch.arange(5)
    sd = sim.state_dict()
    parts = C.from_torchmultimodal(sd, CFG)
    assert parts["queue"]["ptr"].item() == 5 and parts["queue"]["idx"][5].item() == -1
    torch.testing.assert_close(parts["queue"]["image"], sd["image_queue"].T)
    back = C.to_torchmultimodal(
        {**A.init(CFG, META), **parts["params"]},
        CFG,
        momentum=parts["momentum"],
        queue=parts["queue"],
        text_mlp_out=3,
    )
    assert back.keys() == sd.keys()
    for k in sd:  # temp travels as its log: exact up to float rounding
        if k == "temp":
            torch.testing.assert_close(back[k], sd[k], atol=0, rtol=1e-6)
        else:
            assert torch.equal(back[k].to(sd[k].dtype), sd[k]), k


def test_a_bad_state_dict_lists_every_missing_and_mis_shaped_key(tmm):
    sd = dict(tmm[0].state_dict())
    del sd["multimodal_encoder.layer.1.cross_attention.key.bias"]
    sd["vision_encoder.encoder.class_token"] = torch.zeros(1, 1, W + 1)
    with pytest.raises(ConversionError) as err:
        C.from_torchmultimodal(sd, CFG)
    msg = str(err.value)
    assert "missing: multimodal_encoder.layer.1.cross_attention.key.bias" in msg
    assert "mismatched vision_encoder.encoder.class_token" in msg
