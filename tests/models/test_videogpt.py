"""VideoGPT: parity with TorchMultimodal's video VQ-VAE and MultimodalGPT on identical random
weights (reduced sizes), round-trip conversion, cached greedy decoding, the train state."""

import pytest
import torch

import fmm
from models import videogpt as vg
from models.videogpt import convert
from tests.models.videogpt_reference import reference_gpt, reference_vqvae
from tests.reference import reference

tmm_generate = reference("torchmultimodal.utils.generate")

VQ = vg.VideoVQVAEConfig(
    frames=4, image_size=16, down_kernels=((4, 4, 4), (3, 4, 4)),
    down_strides=((2, 2, 2), (1, 2, 2)), encoder_hidden=8, attn_hidden=8, decoder_hidden=6,
    res_layers=2, codebook_size=16, code_dim=6,
)  # fmt: skip
GPT = vg.VideoGPTConfig(
    text_vocab=11, text_len=5, video_vocab=VQ.codebook_size, code_dim=VQ.code_dim,
    latent_shape=VQ.latent_shape, text_dim=7, width=12, layers=2, heads=2,
)  # fmt: skip


def test_vqvae_parity_encode_decode_and_roundtrip():
    ref = reference_vqvae(VQ)
    params = convert.vqvae_from_torchmultimodal(ref.state_dict(), VQ)
    x = torch.rand(2, 3, 4, 16, 16) - 0.5
    with torch.no_grad():
        want = ref(x)
        codes = vg.encode(params, x, cfg=VQ)
        assert torch.equal(codes, want.codebook_output.codebook_indices)
        z = vg.apply_vqvae(params, x, cfg=VQ)
        torch.testing.assert_close(z["reconstruction"], want.decoded, atol=1e-5, rtol=0)
        torch.testing.assert_close(vg.decode(params, codes, cfg=VQ), ref.decode(codes), atol=1e-5, rtol=0)  # fmt: skip
    # Export and reload through TorchMultimodal's strict load_state_dict.
    sd = convert.vqvae_to_torchmultimodal(params, VQ)
    fresh = reference_vqvae(VQ, seed=5)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).decoded, want.decoded, atol=1e-6, rtol=0)
    state = convert.vqvae_state_from_torchmultimodal(ref.state_dict())
    assert state["embed_sum"].shape == (VQ.codebook_size, VQ.code_dim)


def test_gpt_parity_logits():
    ref = reference_gpt(GPT, VQ)
    sd = ref.state_dict()
    params = convert.gpt_from_torchmultimodal(sd, GPT)
    text = torch.randint(0, GPT.text_vocab, (2, GPT.text_len))
    codes = torch.randint(0, GPT.video_vocab, (2, GPT.latent_len))
    with torch.no_grad():
        want = ref(
            in_tokens=text, out_tokens=codes, causal=True,
            right_shift=True, attn_mask=torch.tril(torch.ones(GPT.seq_len, GPT.seq_len)),
        ).logits  # fmt: skip
        got = vg.apply(params, text, codes, cfg=GPT)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    back = convert.gpt_to_torchmultimodal(params, GPT)
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_greedy_codes_match_torchmultimodal_generation():
    ref = reference_gpt(GPT, VQ)
    params = convert.gpt_from_torchmultimodal(ref.state_dict(), GPT)
    text = torch.randint(0, GPT.text_vocab, (2, GPT.text_len))
    # top_k=1 makes the reference's multinomial draw the argmax.
    out = tmm_generate.GenerationUtil(ref).sample(
        text, max_seq_len=GPT.latent_len, use_cache=True, causal=True, top_k=1
    )
    ours = vg.generate_codes(params, text, cfg=GPT, temperature=0)
    assert torch.equal(ours, out.tokens)


def test_vqvae_train_state_moves_codebook_and_norms():
    cfg = vg.video_vqvae_tiny()
    params = vg.init_vqvae(cfg, fmm.random.key(0))
    state = vg.init_state(cfg, params, fmm.random.key(1))
    x = torch.rand(2, 3, cfg.frames, cfg.image_size, cfg.image_size) - 0.5
    _, metrics = vg.vqvae_loss(params, {"videos": x}, cfg=cfg)
    new, new_state = vg.update_state(state, params, metrics["aux"], cfg=cfg, key=fmm.random.key(2))
    assert not torch.equal(new["codebook"]["weight"], params["codebook"]["weight"])
    bn, old = new["encoder"]["norm"], params["encoder"]["norm"]
    assert not torch.equal(bn["running_mean"], old["running_mean"])
    assert torch.equal(old["running_mean"], torch.zeros_like(old["running_mean"]))  # pure
    assert new_state["cluster_size"].shape == (cfg.codebook_size,)


def test_bad_input_names_the_argument():
    params = vg.init_gpt(GPT, fmm.random.key(0))
    with pytest.raises(ValueError, match="text"):
        vg.generate_codes(params, torch.zeros(2, GPT.text_len + 1, dtype=torch.long), cfg=GPT)
    vq = vg.init_vqvae(VQ, fmm.random.key(0))
    with pytest.raises(ValueError, match="videos"):
        vg.encode(vq, torch.rand(2, 3, 5, 16, 16), cfg=VQ)
    with pytest.raises(ValueError, match="width"):
        vg.VideoGPTConfig(text_vocab=4, text_len=2, video_vocab=4, code_dim=2,
                          latent_shape=(1, 2, 2), width=10)  # fmt: skip


@pytest.mark.slow
def test_benchmark_quick_reports_same_codes():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "benchmarks/video.py", "--quick"], cwd=root, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line for line in done.stdout.splitlines() if line.startswith(("fmm", "torchmultimodal"))
    ]
    assert len(rows) == 2 and all(line.endswith("True") for line in rows), done.stdout
