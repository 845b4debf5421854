"""SIGKILL at random moments of a run's saves: the run always loads as one whole save (params
and config of the same step), and what a kill leaves behind is removed by the next save."""

import json
import multiprocessing
import os
import random
import signal
import time

import numpy as np
import torch
from safetensors.torch import load_file

from train import checkpoint

# Each durable step (fsync, rename) of the child takes this long, as on a disk, so a kill can
# land before any one of them, not only inside the long tensor write.
LATENCY = 0.004
SIZES = (1 << 19, 1 << 18)  # 3 MB of float32 params, every value the save's step
KILLS = 24


def _params(step):
    # Built with numpy: the forked child never enters torch's thread pool.
    return {f"t{i}": torch.from_numpy(np.full(n, step, np.float32)) for i, n in enumerate(SIZES)}


def _save(run_dir, step):
    checkpoint.save(run_dir, _params(step), config={"step": step})


def _counted(op, events, latency):
    def durable_step(*args, **kwargs):
        with events.get_lock():
            events.value += 1
        time.sleep(latency)
        return op(*args, **kwargs)

    return durable_step


def _save_until_killed(run_dir, first_step, events):
    torch.set_num_threads(1)
    os.fsync = _counted(os.fsync, events, LATENCY)
    os.replace = _counted(os.replace, events, LATENCY)
    for step in range(first_step, first_step + 50):
        _save(run_dir, step)
    os._exit(3)  # not reached: the test kills it long before


def _on_disk(run_dir):
    """The steps the plain files hold, read as plain files (no manifest involved)."""
    config = json.loads((run_dir / "config.json").read_text())["step"]
    return int(load_file(run_dir / "params.safetensors")["t0"][0]), config


def _temp_files(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def test_sigkill_at_random_moments_of_saves_never_mixes_two_saves(tmp_path, monkeypatch):
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    _save(run_dir, 0)
    with monkeypatch.context() as m:  # how many durable steps one save takes
        counter = ctx.Value("i", 0)
        m.setattr(os, "fsync", _counted(os.fsync, counter, 0))
        m.setattr(os, "replace", _counted(os.replace, counter, 0))
        _save(run_dir, 1)
    per_save = counter.value
    # Every durable step of two saves in a row is a kill target; after reaching it, a random
    # delay lands the kill just before that step or in the work that follows it.
    targets = list(range(2 * per_save))
    targets += [rng.randrange(2 * per_save) for _ in range(KILLS - len(targets))]
    rng.shuffle(targets)
    assert len(targets) >= 20
    complete, mixed_on_disk = 1, 0
    for target in targets:
        events = ctx.Value("i", 0)
        child = ctx.Process(target=_save_until_killed, args=(run_dir, complete + 1, events))
        child.start()
        try:
            deadline = time.monotonic() + 20
            while events.value <= target:
                assert child.is_alive(), f"the saving child died by itself: {child.exitcode}"
                assert time.monotonic() < deadline, f"durable step {target} never came"
                time.sleep(0.0002)
            time.sleep(rng.uniform(0, 2 * LATENCY))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        assert child.exitcode == -signal.SIGKILL

        params, config = checkpoint.load(run_dir)
        step = config["step"]
        assert all(torch.all(t == step) for t in params.values()), (
            f"kill at durable step {target}: config.json of step {step}, params of step(s) "
            f"{sorted({int(v) for t in params.values() for v in t.unique()})}"
        )
        assert step >= complete  # a kill never loses the last complete save
        assert len(_temp_files(run_dir)) <= 3, _temp_files(run_dir)  # one save's, at most
        mixed_on_disk += len({*_on_disk(run_dir), step}) > 1

        complete = step + 1
        _save(run_dir, complete)  # the next save removes what the kill left
        assert _temp_files(run_dir) == []
        assert checkpoint.load_config(run_dir)["step"] == complete
    # Some kills fell after a commit point, before its renames: the plain files were a mix
    # there and the loads above still read one save.
    assert mixed_on_disk >= 1
