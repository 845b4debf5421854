"""`python -m train serve`: flags are checked before anything loads, and a run it cannot
serve is named."""

import pytest

from tests.serve._runs import tiny_clip_run
from train import checkpoint
from train.__main__ import cli, main


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch", "0", "--max-batch must be >= 1, got '0'"),
        ("--max-queue", "0", "--max-queue must be >= 1"),
        ("--max-wait-ms", "-1", "--max-wait-ms must be >= 0"),
        ("--timeout-s", "0", "--timeout-s must be > 0"),
        ("--timeout-s", "nan", "--timeout-s must be a finite number"),
        ("--max-body-mb", "0", "--max-body-mb must be > 0"),
        ("--header-timeout-s", "0", "--header-timeout-s must be > 0"),
        ("--body-timeout-s", "-1", "--body-timeout-s must be > 0"),
        ("--keep-alive-s", "0", "--keep-alive-s must be > 0"),
        ("--store-cache-mb", "-1", "--store-cache-mb must be >= 0"),
        ("--max-connections", "0", "--max-connections must be >= 1"),
        ("--port", "70000", "--port must be >= 0 and <= 65535"),
        ("--max-buffered-mb", "1", "--max-buffered-mb (1.0) must be at least --max-body-mb"),
    ],
)
def test_bad_flags_are_refused_by_name_in_one_line(tmp_path, capsys, flag, value, message):
    try:
        status = cli(["serve", "--ckpt", str(tmp_path), flag, value])
    except SystemExit as e:  # argparse's refusals leave from inside the parser
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_run_of_another_kind_is_refused_by_name(tmp_path):
    params, config = checkpoint.load(tiny_clip_run(tmp_path / "clip"))
    run_dir = tmp_path / "run"  # saved whole as another kind: a save is one checked unit
    checkpoint.save(run_dir, params, config={**config, "model": "vqvae"})
    with pytest.raises(checkpoint.CheckpointError, match="holds a 'vqvae' run"):
        main(["serve", "--ckpt", str(run_dir), "--port", "0"])
    with pytest.raises(checkpoint.CheckpointError, match=r"no config\.json"):
        main(["serve", "--ckpt", str(tmp_path / "missing"), "--port", "0"])
