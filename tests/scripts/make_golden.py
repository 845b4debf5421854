"""Regenerate the golden files in tests/golden/: param specs (names, shapes, dtypes per
preset) and the numeric golden (each family's loss at fixed keys, ``numeric.json``).

Run only after a deliberate change: ``python tests/scripts/make_golden.py`` (all presets),
``python tests/scripts/make_golden.py NAME ...`` (only those presets), or
``python tests/scripts/make_golden.py --numeric`` (the loss values of the contract suite,
tests/test_family_contract.py, which builds them the same way).
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


def numeric() -> None:
    sys.path.insert(0, str(GOLDEN.parents[1]))  # the repo root, for `tests.`
    from tests.test_family_contract import FAMILIES, Case

    values = {}
    for name in sorted(FAMILIES):
        case = Case(name)
        loss, _ = case.loss(case.params, case.batch, fmm.random.key(3))
        values[name] = {"preset": case.preset, "loss": round(float(loss), 6)}
    (GOLDEN / "numeric.json").write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    print("wrote", GOLDEN / "numeric.json", values)


def main(names: list[str] | None = None) -> None:
    if names == ["--numeric"]:
        return numeric()
    GOLDEN.mkdir(exist_ok=True)
    for name in names or sorted(models.REGISTRY):
        (GOLDEN / f"{name}.json").write_text(json.dumps(spec(name), indent=1) + "\n")
        print("wrote", GOLDEN / f"{name}.json")


if __name__ == "__main__":
    main(sys.argv[1:])
