"""Regenerate the golden param specs in tests/golden/ (names, shapes, dtypes per preset).

Run only after a deliberate change of a model's params: ``python tests/scripts/make_golden.py``
(all presets) or ``python tests/scripts/make_golden.py NAME ...`` (only those presets).
"""

import json
import sys
from pathlib import Path

import fmm
import models

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def spec(name: str) -> dict:
    cfg = models.get_config(name)
    family = models.family_of(cfg)
    params = family.init(cfg, fmm.random.key(0).to("meta"))
    return {
        k: f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
        for k, v in fmm.tree.flatten(params).items()
    }


def main(names: list[str] | None = None) -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name in names or sorted(models.REGISTRY):
        (GOLDEN / f"{name}.json").write_text(json.dumps(spec(name), indent=1) + "\n")
        print("wrote", GOLDEN / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1:])
