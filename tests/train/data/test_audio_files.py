"""Users' audio: WAV/FLAC decoding (round trip, mono mixdown, resampling, windows), the
limits that refuse a file by name, the audio formats, AudioSamples and the audio-csv export."""

import csv
import math

import numpy as np
import pytest
import soundfile
import torch

from train.data.audio import AudioSamples, decode_audio, write_audio
from train.data.formats import open_table, sniff
from train.data.images import BadSample
from train.data.pipeline import Labels, LoaderSource
from train.data.sounds import SoundWorldConfig, class_names, is_holdout
from train.recipes.export_sounds import export_sounds


def _tone(hz=440.0, rate=16000, seconds=0.5):
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * math.pi * hz * t)).float()


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_wav_and_flac_round_trip_to_16_bit(tmp_path, suffix):
    wave = _tone()
    write_audio(tmp_path / f"a{suffix}", wave, rate=16000)
    back = decode_audio(tmp_path / f"a{suffix}", where="a", rate=16000)
    assert back.shape == wave.shape and back.dtype == torch.float32
    assert (back - wave).abs().max() < 1 / 2**14


def test_stereo_is_mixed_down_and_resampled_keeping_the_pitch(tmp_path):
    left = _tone(1000.0, rate=44100).numpy()
    soundfile.write(tmp_path / "s.wav", np.stack([left, np.zeros_like(left)], 1), 44100)
    wave = decode_audio(tmp_path / "s.wav", where="s.wav", rate=16000)
    assert wave.shape == (8000,)
    middle = wave[800:-800]
    assert abs(middle.abs().max() - 0.25) < 0.01  # the mean of a tone and silence
    assert torch.fft.rfft(middle).abs().argmax() * 16000 / middle.shape[0] == pytest.approx(
        1000, abs=5
    )


def test_a_window_is_cut_from_the_drawn_start_and_a_short_clip_padded(tmp_path):
    ramp = torch.linspace(-0.5, 0.5, 16000)
    write_audio(tmp_path / "r.wav", ramp, rate=16000)
    first = decode_audio(tmp_path / "r.wav", where="r", rate=16000, seconds=0.25, start=0.0)
    last = decode_audio(tmp_path / "r.wav", where="r", rate=16000, seconds=0.25, start=1.0)
    assert first.shape == last.shape == (4000,)
    assert first[0] == pytest.approx(-0.5, abs=1e-3) and last[-1] == pytest.approx(0.5, abs=1e-3)
    padded = decode_audio(tmp_path / "r.wav", where="r", rate=16000, seconds=2.0)
    assert padded.shape == (32000,) and (padded[16000:] == 0).all()


def test_limits_and_broken_files_are_refused_naming_the_file(tmp_path):
    write_audio(tmp_path / "ok.wav", _tone(), rate=16000)
    soundfile.write(tmp_path / "three.wav", np.zeros((100, 3), np.float32), 16000)
    soundfile.write(tmp_path / "flac.wav", np.zeros(100, np.float32), 16000, format="FLAC")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    cases = [
        ("ok.wav", {"max_bytes": 100}, "more than the limit of 100"),
        ("ok.wav", {"max_seconds": 0.1}, "0.5 s is more than the limit"),
        ("three.wav", {"max_channels": 2}, "3 channels"),
        ("flac.wav", {}, "holds FLAC audio"),
        ("broken.wav", {}, "cannot decode the audio"),
        ("missing.flac", {}, "cannot read the audio"),
        ("ok.mp3", {}, "not an audio file name"),
    ]
    for name, limits, message in cases:
        with pytest.raises(BadSample, match=message) as caught:
            decode_audio(tmp_path / name, where=name, rate=16000, **limits)
        assert caught.value.where == name


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_audio_formats_open_as_their_kinds_and_are_sniffed(tmp_path):
    for name in ("a.wav", "b.flac"):
        write_audio(tmp_path / name, _tone(seconds=0.1), rate=16000)
    _write_csv(
        tmp_path / "both.csv",
        ("audio", "caption", "label"),
        [("a.wav", "a tone", "tone"), ("b.flac", "", "")],
    )
    _write_csv(tmp_path / "pairs.tsv", ("audio\tcaption",), [("a.wav\ta tone",)])
    table = open_table(tmp_path / "both.csv")
    assert sniff(str(tmp_path / "both.csv")) == "audio-csv" and table.kind == "audio-classes"
    assert table.texts(0) == ("a tone",) and table.label(0) == 0 and table.label(1) == -1
    assert table.clip_file(1) == tmp_path / "b.flac"
    with pytest.raises(ValueError, match="is an audio clip"):
        table.image_bytes(0)
    assert open_table(tmp_path / "pairs.tsv").kind == "audio-pairs"
    folder = tmp_path / "folder"
    (folder / "dog_bark").mkdir(parents=True)
    write_audio(folder / "dog_bark" / "1.wav", _tone(seconds=0.1), rate=16000)
    classes = open_table(folder)
    assert classes.format == "audio-classes" and classes.class_names == ("dog bark",)
    (folder / "dog_bark" / "1.txt").write_text("a dog barks")
    captioned = open_table(folder)
    assert captioned.format == "audio-folder" and captioned.texts(0) == ("a dog barks",)


def test_audio_samples_feed_the_loader_and_skip_bad_files(tmp_path):
    for i in range(3):
        write_audio(tmp_path / f"{i}.wav", _tone(200.0 * (i + 1), seconds=0.3), rate=16000)
    (tmp_path / "3.wav").write_bytes(b"not audio")
    rows = [(f"{i}.wav", f"clip {i}", f"c{i % 2}") for i in range(4)]
    _write_csv(tmp_path / "t.csv", ("audio", "caption", "label"), rows)
    table = open_table(tmp_path / "t.csv")
    samples = AudioSamples(table, Labels(), rate=8000, seconds=0.2, seed=0)
    source = LoaderSource(samples, batch_size=4, seed=0, workers=0, max_bad_fraction=1.0)
    batch = next(source)
    assert batch["audio"].shape == (4, 1600) and batch["labels"].dtype == torch.int64
    assert source.report()["skipped_samples"] == 1
    again = AudioSamples(table, Labels(), rate=8000, seconds=0.2, seed=0)
    assert torch.equal(samples.sample(3, 1)["audio"], again.sample(3, 1)["audio"])


def test_export_audio_csv_writes_the_world_as_audio_tables(tmp_path):
    data = export_sounds(tmp_path / "out", n=6, seconds=0.5, per_class=1)
    train = open_table(data)
    assert train.kind == "audio-classes" and len(train) == 6
    world, names = SoundWorldConfig(), class_names(SoundWorldConfig())
    held = {n for n, h in zip(names, is_holdout(world, torch.arange(len(names))).tolist()) if h}
    assert len(held) == len(world.holdout)
    assert not held & {train.classes[train.label(i)] for i in range(6)}
    val = open_table(tmp_path / "out" / "val.csv")
    assert sorted(val.classes) == sorted(names)
    with open(tmp_path / "out" / "val.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows if r["heldout"] == "1"} == held
    wave = decode_audio(val.clip_file(0), where="val", rate=16000)
    assert wave.shape == (8000,) and wave.abs().max() > 0.05
