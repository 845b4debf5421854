"""Checkpoints: bit-exact round trips, atomic writes, and clear errors, nothing half-loaded."""

import pytest
import torch

import fmm
from models import clip
from train import checkpoint
from train.checkpoint import CheckpointError

CFG = clip.clip_tiny(vocab_size=11, context_length=5)


@pytest.fixture
def params():
    return clip.init(CFG, fmm.random.key(0))


def _equal(a, b):
    fa, fb = fmm.tree.flatten(a), fmm.tree.flatten(b)
    return fa.keys() == fb.keys() and all(
        torch.equal(fa[k], fb[k]) and fa[k].dtype == fb[k].dtype for k in fa
    )


def test_save_then_load_is_bit_exact(tmp_path, params):
    checkpoint.save(tmp_path, params, config={"clip": CFG.to_dict()})
    loaded, config = checkpoint.load(tmp_path, like=clip.init(CFG, fmm.random.key(0).to("meta")))
    assert _equal(loaded, params)
    assert clip.CLIPConfig(**config["clip"]) == CFG


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, params, monkeypatch):
    checkpoint.save(tmp_path, params, config={"v": 1})

    def broken(flat, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(checkpoint, "save_file", broken)
    changed = fmm.tree.map(lambda x: x + 1, params)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, changed, config={"v": 2})
    loaded, config = checkpoint.load(tmp_path)
    assert _equal(loaded, params) and config == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "params.safetensors"]


def test_corrupt_params_file_is_a_clear_error(tmp_path, params):
    checkpoint.save(tmp_path, params, config={})
    path = tmp_path / checkpoint.PARAMS_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt params file"):
        checkpoint.load(tmp_path)


def test_missing_run_and_corrupt_config(tmp_path, params):
    with pytest.raises(CheckpointError, match="not a saved run"):
        checkpoint.load(tmp_path)
    checkpoint.save(tmp_path, params, config={})
    (tmp_path / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"corrupt .*config\.json"):
        checkpoint.load(tmp_path)


def test_mismatched_checkpoint_lists_every_problem(tmp_path, params):
    flat = fmm.tree.flatten(params)
    flat.pop("text.proj.weight")
    flat["text.extra"] = torch.zeros(2)
    flat["logit_scale"] = torch.zeros(3)
    checkpoint.save_params(tmp_path / "p.safetensors", fmm.tree.unflatten(flat))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_params(tmp_path / "p.safetensors", like=params)
    message = str(info.value)
    assert "missing: text.proj.weight" in message
    assert "unexpected: text.extra" in message
    assert "mismatched logit_scale: expected [] torch.float32, got [3] torch.float32" in message
