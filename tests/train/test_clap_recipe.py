"""``python -m train clap`` end to end at a tiny size: the zero-shot metrics over the sound
world's classes, the figures, the saved audio config, and ``--data`` on users' clips."""

import csv
import json

import pytest
import torch

from train.__main__ import main
from train.data import WordTokenizer, sounds
from train.data.audio import write_audio
from train.loop import load_run
from train.recipes.clap import captioned_pool

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "2", "--batch-size", "4", "--eval-per-class", "1"]
SPLITS = ("", "_seen_combos", "_unseen_combos")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clap") / "run"
    main(["clap", "--sound-pool", "8", "--out", str(out), *TINY])
    return out


def test_the_run_reports_zero_shot_over_the_sound_classes(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["zero_shot_classes"] == metrics["eval_clips"] == 12  # one clip per class
    for what in ("zero_shot", "zero_shot_pitch", "zero_shot_timbre"):
        for split in SPLITS:
            assert 0.0 <= metrics[f"{what}_top1{split}"] <= 1.0, (what, split)
    # A right class has the right pitch and timbre.
    assert metrics["zero_shot_top1"] <= min(
        metrics["zero_shot_pitch_top1"], metrics["zero_shot_timbre_top1"]
    )
    for name in ("zero_shot.png", "confusion.png"):
        assert (run / name).read_bytes()[:8] == PNG


def test_the_run_saves_the_audio_tower_and_its_front_end(run):
    saved = load_run(run, family="clip")
    assert saved.cfg.image_size == (64, 32) and saved.cfg.in_channels == 1
    assert saved.config["modality"] == "audio"
    assert saved.config["mel"]["mels"] == 32


def test_the_pool_never_sounds_a_held_out_pair_and_fits_the_tower():
    world = sounds.SoundWorldConfig(seconds=1.0)
    tokenizer = WordTokenizer(sounds.vocabulary(world))
    pool = captioned_pool(world, tokenizer, 20, 24, seed=0, chunk=10)
    assert pool["images"].shape == (24, 1, 64, 32) and pool["tokens"].shape == (24, 20)
    # The captions name every sound of a clip; none is of a held-out pair.
    for text in tokenizer.decode(pool["tokens"]):
        for pitch, timbre in world.holdout:
            noun, plural = sounds.TIMBRES[timbre]
            assert f"{pitch} {noun}" not in text and f"{pitch} {plural}" not in text, text


def test_data_trains_on_users_captioned_clips(tmp_path):
    world = sounds.SoundWorldConfig(seconds=1.0)
    clips = sounds.sample_sounds(world, 4, generator=torch.Generator().manual_seed(0))
    rows = []
    for i, (wave, caption) in enumerate(zip(clips.waves, clips.captions)):
        write_audio(tmp_path / f"{i}.wav", wave, rate=world.sample_rate)
        rows.append((f"{i}.wav", caption))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("audio", "caption"), *rows])
    out = tmp_path / "run"
    main(["clap", "--data", str(tmp_path / "pairs.csv"), "--workers", "0", "--vocab-size",
          "300", "--out", str(out), *TINY])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["zero_shot_top1"] <= 1.0
    assert load_run(out, family="clip").config["data"].endswith("pairs.csv")
