"""models.mmgpt: causal forward, caption -> image loss, the logits mask, cached generation."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fmm
from fmm import decoding
from models import mmgpt

# Odd sizes catch transposed layouts; two real blocks.
CFG = mmgpt.MMGPTConfig(text_vocab=11, text_len=5, image_vocab=7, image_len=6, width=24, layers=2,
                        heads=3)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    return mmgpt.init(CFG, fmm.random.key(0))


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "text": torch.randint(0, CFG.text_vocab, (b, CFG.text_len), generator=g),
        "codes": torch.randint(0, CFG.image_vocab, (b, CFG.image_len), generator=g),
    }


def test_apply_is_causal_over_the_joint_sequence(params):
    seq = mmgpt.sequence(**_batch(), cfg=CFG)
    logits = mmgpt.apply(params, seq, cfg=CFG)
    assert logits.shape == (3, CFG.seq_len, CFG.vocab_size)
    changed = seq.clone()
    changed[:, 7] = CFG.text_vocab + (changed[:, 7] - CFG.text_vocab + 1) % CFG.image_vocab
    other = mmgpt.apply(params, changed, cfg=CFG)
    torch.testing.assert_close(other[:, :7], logits[:, :7])
    assert not torch.allclose(other[:, 7:], logits[:, 7:])


def test_each_modality_has_its_own_embedding_and_head(params):
    flat = fmm.tree.flatten(params)
    assert flat["text.token.weight"].shape == (11, 24)
    assert flat["image.token.weight"].shape == (7, 24)
    assert flat["text.head.weight"].shape == (11, 24)
    assert flat["image.head.weight"].shape == (7, 24)
    assert flat["pos"].shape == (CFG.seq_len, 24)
    # image code c and text id c embed differently
    seq = torch.tensor([[3, 3 + CFG.text_vocab]])
    x = mmgpt.embed_tokens(params, seq, cfg=CFG) - params["pos"][:2]
    torch.testing.assert_close(x[0, 0], params["text"]["token"]["weight"][3])
    torch.testing.assert_close(x[0, 1], params["image"]["token"]["weight"][3])


def test_loss_scores_image_tokens_only(params):
    batch = _batch()
    value, metrics = mmgpt.loss(params, batch, cfg=CFG)
    grads = torch.func.grad(lambda p: mmgpt.loss(p, batch, cfg=CFG)[0])(params)
    assert torch.count_nonzero(grads["text"]["head"]["weight"]) == 0
    assert torch.count_nonzero(grads["image"]["head"]["weight"]) > 0
    # equals cross-entropy of the image-masked joint logits at the image positions
    seq = mmgpt.sequence(**batch, cfg=CFG)
    logits = mmgpt.mask_logits(
        mmgpt.apply(params, seq[:, :-1], cfg=CFG), mmgpt.modality_mask(CFG, "image")
    )
    want = torch.nn.functional.cross_entropy(
        logits[:, CFG.text_len - 1 :].reshape(-1, CFG.vocab_size),
        seq[:, CFG.text_len :].reshape(-1),
    )
    torch.testing.assert_close(value, want)
    assert 0.0 <= float(metrics["image_accuracy"]) <= 1.0
    with_text = mmgpt.MMGPTConfig(**{**CFG.to_dict(), "text_loss_weight": 0.5})
    assert mmgpt.loss(params, batch, cfg=with_text)[0] > value


@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
       top_k=st.sampled_from([None, 1, 3, 18]), guidance=st.sampled_from([1.0, 0.0, 2.5]))  # fmt: skip
def test_logits_mask_never_samples_a_text_token_in_an_image_position(
    seed, temperature, top_k, guidance
):
    params = mmgpt.init(CFG, fmm.random.key(seed % 7))
    # A text head that dwarfs the image head: unmasked, every sample would be a text id.
    params = {
        **params,
        "text": {**params["text"], "head": {"weight": params["text"]["head"]["weight"] * 1e4}},
    }
    text = torch.randint(
        0, CFG.text_vocab, (4, CFG.text_len), generator=torch.Generator().manual_seed(seed)
    )
    codes = mmgpt.generate_images(
        params, text, cfg=CFG, key=fmm.random.key(seed), temperature=temperature, top_k=top_k,
        guidance=guidance, null_text=text[:1],
    )  # fmt: skip
    assert codes.shape == (4, CFG.image_len)
    assert int(codes.min()) >= 0 and int(codes.max()) < CFG.image_vocab


def test_cached_generation_equals_greedy_full_forward(params):
    text = _batch()["text"]
    codes = mmgpt.generate_images(params, text, cfg=CFG, temperature=0.0)
    seq, allowed = text, mmgpt.modality_mask(CFG, "image")
    for _ in range(CFG.image_len):
        logits = mmgpt.mask_logits(mmgpt.apply(params, seq, cfg=CFG)[:, -1], allowed)
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(codes, seq[:, CFG.text_len :] - CFG.text_vocab)


def test_prefill_and_decode_steps_equal_the_full_causal_forward(params):
    seq = mmgpt.sequence(**_batch(), cfg=CFG)
    spec = mmgpt.image_decoder_spec(CFG)
    full = mmgpt.mask_logits(mmgpt.apply(params, seq, cfg=CFG), mmgpt.modality_mask(CFG, "image"))
    cache = decoding.init_cache(spec, 3, CFG.seq_len)
    split = CFG.text_len + 2
    logits, cache = decoding.prefill(params, seq[:, :split], cache, cfg=spec)
    steps = [logits]
    for i in range(split, CFG.seq_len):
        logits, cache = decoding.decode_step(params, seq[:, i], cache, cfg=spec)
        steps.append(logits.reshape(3, 1, -1))
    got = torch.cat(steps, dim=1)
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(got))
    torch.testing.assert_close(got[finite], full[finite], rtol=1e-5, atol=1e-5)


def test_guidance_combines_conditional_and_unconditional_logits(params):
    text, null = _batch()["text"], torch.tensor([[2, 10, 0, 0, 0]])
    plain = mmgpt.generate_images(params, text, cfg=CFG, temperature=0.0)
    near_one = mmgpt.generate_images(
        params, text, cfg=CFG, temperature=0.0, guidance=1.0 + 1e-6, null_text=null
    )
    assert torch.equal(plain, near_one)
    # greedy with guidance 2 by full forwards: 2 * cond - uncond at every step
    scale, codes = (
        2.0,
        mmgpt.generate_images(params, text, cfg=CFG, temperature=0.0, guidance=2.0, null_text=null),
    )
    cond, uncond = text, null.expand(3, -1)
    tv = CFG.text_vocab
    for _ in range(CFG.image_len):
        lc = mmgpt.apply(params, cond, cfg=CFG)[:, -1, tv:]
        lu = mmgpt.apply(params, uncond, cfg=CFG)[:, -1, tv:]
        nxt = (lu + scale * (lc - lu)).argmax(-1, keepdim=True) + tv
        cond, uncond = torch.cat([cond, nxt], 1), torch.cat([uncond, nxt], 1)
    assert torch.equal(codes, cond[:, CFG.text_len :] - tv)
    with pytest.raises(ValueError, match="needs null_text"):
        mmgpt.generate_images(params, text, cfg=CFG, key=fmm.random.key(0), guidance=2.0)


def test_generating_twice_with_one_key_gives_the_same_images(params):
    text = _batch()["text"]
    a = mmgpt.generate_images(params, text, cfg=CFG, key=fmm.random.key(3))
    b = mmgpt.generate_images(params, text, cfg=CFG, key=fmm.random.key(3))
    c = mmgpt.generate_images(params, text, cfg=CFG, key=fmm.random.key(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_input_is_refused_with_shapes(params):
    batch = _batch()
    with pytest.raises(ValueError, match=r"text must have shape \[batch, 5\], got \[3, 4\]"):
        mmgpt.generate_images(params, batch["text"][:, :4], cfg=CFG, key=fmm.random.key(0))
    with pytest.raises(ValueError, match=r"text must lie in \[0, 11\)"):
        mmgpt.generate_images(params, batch["text"] + 11, cfg=CFG, key=fmm.random.key(0))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\)"):
        mmgpt.sequence(batch["text"], batch["codes"] + 7, cfg=CFG)
    with pytest.raises(ValueError, match=r"codes must have shape \[batch, 6\] \(image_len=6"):
        mmgpt.sequence(batch["text"], batch["codes"][:, :5], cfg=CFG)
    with pytest.raises(ValueError, match=r"tokens must have shape \[batch, 1\.\.11\]"):
        mmgpt.apply(params, torch.zeros(1, 12, dtype=torch.long), cfg=CFG)
    with pytest.raises(ValueError, match="modality must be one of"):
        mmgpt.modality_mask(CFG, "audio")
    with pytest.raises(ValueError, match="image_vocab must be >= 1"):
        mmgpt.MMGPTConfig(text_vocab=3, text_len=2, image_vocab=0, image_len=4)
