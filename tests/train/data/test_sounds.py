"""The sound world: determinism, held-out pairs, and captions that say what is heard."""

import pytest
import torch

from train.data.sounds import (
    LOUDNESS,
    RHYTHMS,
    SoundWorldConfig,
    class_names,
    eval_set,
    is_holdout,
    prompt_templates,
    sample_sounds,
    sound_stream,
    vocabulary,
)

CFG = SoundWorldConfig(seconds=1.0)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_waves_shape_range_and_determinism():
    a, b = next(sound_stream(CFG, 12, seed=3)), next(sound_stream(CFG, 12, seed=3))
    assert a.waves.shape == (12, 16000) and a.waves.dtype == torch.float32
    assert a.waves.abs().max() <= 1
    assert torch.equal(a.waves, b.waves) and a.captions == b.captions
    other = next(sound_stream(CFG, 12, seed=4))
    assert not torch.equal(a.waves, other.waves)
    words = set(vocabulary(CFG))
    assert all(set(c.split()) <= words for c in a.captions)
    assert all(
        set(t.format(n).split()) <= words for t in prompt_templates() for n in class_names(CFG)
    )


def test_train_split_never_sounds_a_held_out_pair():
    sounds = sample_sounds(SoundWorldConfig(seconds=0.25), 600, generator=_gen())
    assert not is_holdout(CFG, sounds.labels).any()
    second = sounds.second[sounds.second >= 0]
    assert second.numel() > 100 and not is_holdout(CFG, second).any()


def test_eval_set_covers_every_class_in_label_order():
    ev = eval_set(SoundWorldConfig(seconds=0.25), 2, seed=1)
    n = len(class_names(CFG))
    assert torch.equal(ev.labels, torch.arange(n).repeat_interleave(2))
    assert is_holdout(CFG, ev.labels).sum() == 2 * len(CFG.holdout)
    assert (ev.second == -1).all() and not any(" then " in c for c in ev.captions)


def test_captions_name_the_first_sound_and_a_second_after_then():
    sounds = sample_sounds(SoundWorldConfig(seconds=0.25, p_sequence=0.5), 64, generator=_gen(2))
    names = class_names(CFG)
    for caption, label, second in zip(sounds.captions, sounds.labels, sounds.second):
        first_part = caption.split(" then ")[0]
        pitch, noun = names[label].split()
        assert pitch in first_part.split() and noun in first_part  # "tone" in "tones"
        assert (" then " in caption) == (second >= 0)


def _dominant_hz(waves, rate):
    return torch.fft.rfft(waves).abs().argmax(dim=1).float() * rate / waves.shape[1]


def test_high_sounds_have_a_higher_dominant_frequency_than_mid_and_low():
    ev = eval_set(CFG, 6, seed=5)
    hz = _dominant_hz(ev.waves, CFG.sample_rate)
    low, mid, high = (hz[ev.pitch == CFG.pitches.index(p)] for p in ("low", "mid", "high"))
    assert low.max() < mid.min() and mid.max() < high.min()


def _bursts(wave, rate, floor_rms=0.006):
    """Runs of 40 ms frames louder than three times the noise floor's."""
    size = rate // 25
    frames = wave[: wave.shape[0] // size * size].view(-1, size)
    loud = (frames.pow(2).mean(1).sqrt() > floor_rms).int()
    return int((loud[1:] > loud[:-1]).sum() + loud[0]), loud.float().mean().item()


def test_rhythm_words_count_the_energy_bursts():
    ev = eval_set(CFG, 8, seed=7)
    expected = {"one long": 1, "two short": 2, "three short": 3, "steady": 1}
    names = tuple(RHYTHMS)
    for wave, rhythm in zip(ev.waves, ev.rhythm):
        count, share = _bursts(wave, CFG.sample_rate)
        assert count == expected[names[rhythm]], (names[rhythm], count)
        if names[rhythm] == "steady":
            assert share > 0.95


def test_loud_sounds_are_louder_than_quiet_ones():
    ev = eval_set(CFG, 8, seed=9)
    rms = ev.waves.pow(2).mean(1).sqrt()
    quiet, loud = (rms[ev.loudness == tuple(LOUDNESS).index(k)] for k in ("quiet", "loud"))
    assert loud.mean() > 2.5 * quiet.mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"holdout": (("high", "violin"),)}, "holdout entry"),
        ({"pitches": ("low", "shrill")}, "pitches has unknown names"),
        ({"seconds": 0.1}, "seconds must be"),
        ({"p_sequence": 1.5}, "p_sequence must be"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoundWorldConfig(**kwargs)
