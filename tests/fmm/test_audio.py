"""fmm.audio: Kaldi fbank and plain log-mel against independent re-derivations, shapes, and
the resampler's laws (tones keep their frequency, tones past the new Nyquist vanish)."""

import importlib.util
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from fmm.audio import AUDIOMAE, LOG_MEL, MelConfig, log_mel, mel_filterbank, num_frames, resample

KALDI = replace(AUDIOMAE, frames=None, mean=0.0, std=1.0)  # the fbank before AudioMAE's steps


def _numpy_fbank(wave: np.ndarray, mels: int = 128) -> np.ndarray:
    """Kaldi's fbank written out in float64 numpy, frame by frame, from its definition."""
    wave = wave - wave.mean()
    size, hop, n_fft, rate = 400, 160, 512, 16000
    mel = lambda f: 1127.0 * np.log1p(f / 700.0)
    edges = np.linspace(mel(20.0), mel(8000.0), mels + 2)
    bins = mel(np.arange(n_fft // 2) * rate / n_fft)
    bank = np.zeros((mels, n_fft // 2 + 1))
    for m in range(mels):
        up = (bins - edges[m]) / (edges[m + 1] - edges[m])
        down = (edges[m + 2] - bins) / (edges[m + 2] - edges[m + 1])
        bank[m, :-1] = np.maximum(0.0, np.minimum(up, down))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / (size - 1))
    out = []
    for start in range(0, len(wave) - size + 1, hop):
        frame = wave[start : start + size].copy()
        frame -= frame.mean()
        frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        power = np.abs(np.fft.rfft(frame * hann, n=n_fft)) ** 2
        out.append(np.log(np.maximum(bank @ power, np.finfo(np.float32).eps)))
    return np.stack(out)


def _tone(hz, rate, seconds=1.0, batch=1):
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return (0.5 * torch.sin(2 * math.pi * hz * t)).float().expand(batch, -1).contiguous()


def test_kaldi_fbank_matches_a_float64_rederivation():
    wave = torch.randn(2, 8000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    wave = wave * 0.2
    # In float64 the two agree to rounding; in float32 the log of the quietest bins moves
    # by ~1e-4 (1.4e-4 measured).
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        ours = log_mel(wave.to(dtype), KALDI)
        for row, got in zip(wave.numpy(), ours):
            assert np.abs(got.double().numpy() - _numpy_fbank(row)).max() < tolerance


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="torchaudio absent")
def test_parity_with_torchaudio_kaldi_fbank_melspectrogram_and_resample():
    from tests.reference import reference

    kaldi = reference("torchaudio.compliance.kaldi")
    torchaudio = reference("torchaudio")
    wave = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1)) * 0.2
    ref = torch.stack([
        kaldi.fbank(
            (w - w.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10,
        )
        for w in wave
    ])  # fmt: skip
    assert (log_mel(wave, KALDI) - ref).abs().max() < 1e-4
    spec = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=512, win_length=400, hop_length=160, n_mels=64, mel_scale="htk"
    )(wave)
    assert (log_mel(wave, LOG_MEL) - (spec + 1e-6).log().transpose(1, 2)).abs().max() < 1e-4
    x = torch.randn(2, 44100)
    expected = torchaudio.functional.resample(x, 44100, 16000)  # 6 zero crossings, 0.99
    assert (resample(x, 44100, 16000, zeros=6, rolloff=0.99) - expected).abs().max() < 1e-4


def test_audiomae_preset_shapes_padding_and_normalisation():
    wave = torch.randn(3, 16000, generator=torch.Generator().manual_seed(2)) * 0.1
    x = log_mel(wave, AUDIOMAE)
    assert x.shape == (3, 1024, 128) and num_frames(16000, AUDIOMAE) == 98
    # Frames past the clip are zeros before normalising, as AudioMAE pads.
    assert torch.allclose(x[:, 98:], torch.full_like(x[:, 98:], 4.2677393 / (2 * 4.5689974)))
    assert torch.allclose(x[:, :98], (log_mel(wave, KALDI) + 4.2677393) / (2 * 4.5689974))
    long = log_mel(torch.randn(1, 16000 * 11) * 0.1, AUDIOMAE)
    assert long.shape == (1, 1024, 128)
    plain = log_mel(wave, LOG_MEL)
    assert plain.shape == (3, num_frames(16000, LOG_MEL), 64) == (3, 101, 64)


def test_mel_filterbank_rows_are_triangles_ordered_by_frequency():
    for cfg in (KALDI, LOG_MEL):
        bank = mel_filterbank(cfg)
        assert bank.shape == (cfg.bins, cfg.mels) and bank.min() >= 0 and bank.max() <= 1
        # Kaldi's lowest filters at 128 mels are narrower than an FFT bin and may miss every
        # bin (or catch the same one); the others are ordered by their centre of mass.
        weight = bank.sum(dim=0)
        centre = (bank * torch.arange(cfg.bins)[:, None]).sum(dim=0)[weight > 0] / weight[
            weight > 0
        ]
        assert (centre[1:] >= centre[:-1]).all() and (weight > 0).sum() > 0.9 * cfg.mels


def test_a_tone_lights_the_mel_bin_of_its_frequency():
    low, high = (log_mel(_tone(hz, 16000), LOG_MEL).mean(1).argmax(1) for hz in (300, 3000))
    assert low < high


def test_log_mel_is_batched():
    wave = torch.randn(3, 4000, generator=torch.Generator().manual_seed(1)) * 0.1
    alone = torch.cat([log_mel(w[None], KALDI) for w in wave])
    assert torch.allclose(log_mel(wave, KALDI), alone, atol=1e-5)


@pytest.mark.slow  # ~10 s of inductor on two cores
def test_log_mel_compiles_whole_to_the_same_values():
    wave = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0)) * 0.1
    compiled = torch.compile(lambda w: log_mel(w, KALDI), fullgraph=True)
    # Fused float32 sums move the log of the quietest bins (energies ~1e-6) by up to ~4e-4.
    assert torch.allclose(compiled(wave), log_mel(wave, KALDI), atol=1e-3)


@pytest.mark.parametrize("orig, new", [(44100, 16000), (48000, 16000), (8000, 16000)])
def test_resample_keeps_a_tones_frequency_and_the_length_law(orig, new):
    wave = _tone(1000.0, orig, batch=2)
    out = resample(wave, orig, new)
    assert out.shape == (2, math.ceil(wave.shape[1] * new / orig))
    spectrum = torch.fft.rfft(
        out[:, new // 10 : -new // 10] * torch.hann_window(out.shape[1] - 2 * (new // 10))
    )
    peak_hz = spectrum.abs().argmax(1).float() * new / (out.shape[1] - 2 * (new // 10))
    assert (peak_hz - 1000).abs().max() < 5
    # The pass band passes unchanged: the same amplitude away from the clip's edges.
    assert abs(out[:, new // 10 : -new // 10].abs().max() - 0.5) < 0.01


def test_resample_removes_tones_above_the_new_nyquist():
    # 48 kHz -> 16 kHz: a 6 kHz tone passes, a 12 kHz one would alias to 4 kHz and must not.
    kept = resample(_tone(6000.0, 48000), 48000, 16000)[:, 1600:-1600]
    gone = resample(_tone(12000.0, 48000), 48000, 16000)[:, 1600:-1600]
    ratio_db = 20 * math.log10(gone.pow(2).mean().sqrt() / kept.pow(2).mean().sqrt())
    assert ratio_db < -60


def test_resample_to_the_same_rate_is_the_identity_and_rates_are_checked():
    wave = torch.randn(2, 100)
    assert resample(wave, 16000, 16000) is wave
    with pytest.raises(ValueError, match="new_rate"):
        resample(wave, 16000, 0)
    with pytest.raises(ValueError, match="wave"):
        resample(torch.randn(100), 16000, 8000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"window": "kaiser"}, "window must be one of"),
        ({"n_fft": 256}, "n_fft must be even and >= frame_length"),
        ({"low_hz": 9000.0}, "low_hz"),
        ({"frames": 0}, "frames must be"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MelConfig(**kwargs)


def test_a_clip_shorter_than_a_frame_is_refused_naming_wave():
    with pytest.raises(ValueError, match="wave"):
        log_mel(torch.randn(2, 100), KALDI)
