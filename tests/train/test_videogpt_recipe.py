"""video-vqvae -> videogpt end to end for a few steps at the tiny presets: metrics, the frame
strips and the GIF exist, the runs reload, and the GPT embeds codes with the tokenizer's
codebook, frozen."""

import json

import pytest
import torch

from train.__main__ import main
from train.loop import load_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    tiny = ["--steps", "2", "--batch-size", "4", "--eval-per-pair", "1"]
    main(["video-vqvae", "--preset", "video_vqvae_tiny", "--out", str(root / "vq"), *tiny])
    main(["videogpt", "--vqvae", str(root / "vq"), "--width", "24", "--layers", "1",
          "--out", str(root / "gpt"), *tiny])  # fmt: skip
    return root


def test_video_vqvae_reports_psnr_and_perplexity(runs):
    out = runs / "vq"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_psnr_db"] > 0 and metrics["steps"] == 2
    assert 1.0 <= metrics["heldout_code_perplexity"] <= 16
    assert (out / "reconstructions.png").read_bytes()[:8] == PNG
    run = load_run(out, family="video_vqvae")
    assert set(run.model_state) == {"cluster_size", "embed_sum"}
    # Batch-norm running statistics moved with the EMA codebook, one update per step.
    assert not torch.equal(run.params["encoder"]["norm"]["running_mean"], torch.zeros(8))


def test_videogpt_trains_draws_and_keeps_the_codebook(runs):
    out = runs / "gpt"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout_code_nll_seen_pairs"] > 0
    assert metrics["heldout_code_nll_unseen_pairs"] > 0
    assert 1.0 <= metrics["drawn_code_perplexity"] <= 16
    assert (out / "samples.png").read_bytes()[:8] == PNG
    assert (out / "samples.gif").read_bytes()[:6] == b"GIF89a"
    gpt = load_run(out, family="videogpt")
    vq = load_run(runs / "vq", family="video_vqvae")
    assert torch.equal(gpt.params["video"]["token"]["weight"], vq.params["codebook"]["weight"])
