"""Loading a saved run, for every family: one :func:`load_run`.

A run directory written by :func:`train.loop.run` holds ``config.json`` (``"model"``: the
family's name, and under that name its config), ``params.safetensors``, and, when the run
had them, ``tokenizer.json`` and ``model_state.safetensors`` (the family's train state).
:func:`load_run` reads them through one ``train.checkpoint.open_run`` (every file checked
against the run's manifest, every param key and shape against ``init`` on the meta device)
and returns a :class:`Run`.

Example::

    run = load_run("runs/clip", family="clip")
    emb = run.family.serving.embed_text(run.params, run.tokenizer.encode(["a red circle"],
                                        run.cfg.context_length), cfg=run.cfg)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import fmm
import models
from models.family import Family
from train import checkpoint
from train.data.tokenizers import tokenizer_from_json

MODEL_STATE_FILE = "model_state.safetensors"


@dataclass(frozen=True)
class Run:
    """A saved run: its ``family``, model ``cfg``, ``params``, the whole ``config.json``,
    its ``tokenizer`` (``None`` if it saved none), the family's train state (``None`` if
    it has none), and ``saved`` to read its other files from the same save."""

    path: Path
    family: Family
    cfg: Any
    params: Any
    config: dict
    tokenizer: Any
    model_state: Any
    saved: checkpoint.SavedRun

    def more_params(self, name: str, *, like: Any, device: torch.device | str = "cpu") -> Any:
        """Another param file of the run (e.g. an mmgpt run's ``vqvae.safetensors``),
        checked against ``like`` and moved to ``device``."""
        return _to(self.saved.params(name, like=like), device)


def _family(name: Any, run_dir) -> Family:
    try:
        return models.get_family(name)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"{run_dir}/config.json: {e}") from None


def config_from_dict(family: Family, values: Any) -> Any:
    """A family's config from the dict its ``to_dict`` wrote (JSON turns tuples into
    lists: a config class with ``from_dict`` restores them)."""
    if not isinstance(values, dict):
        raise checkpoint.CheckpointError(f"config.json: {family.name!r} must be a mapping")
    build = getattr(family.config, "from_dict", None)
    try:
        return build(values) if build is not None else family.config(**values)
    except (TypeError, ValueError) as e:
        raise checkpoint.CheckpointError(f"config.json: not a {family.name} config: {e}") from e


def _to(tree: Any, device: torch.device | str) -> Any:
    return fmm.tree.map(lambda x: x.to(device), tree)


def load_run(
    run_dir: str | os.PathLike, *, family: str | None = None, device: torch.device | str = "cpu"
) -> Run:
    """The run saved in ``run_dir``, every file checked; ``family``: refuse a run of
    another family (e.g. ``--vqvae`` pointing at a clip run) with a ``CheckpointError``."""
    saved = checkpoint.open_run(run_dir)
    config = saved.config()
    name = config.get("model")
    if family is not None and name != family:
        raise checkpoint.CheckpointError(
            f"{run_dir} holds a {name!r} run, not a run of the {family!r} family"
        )
    fam = _family(name, run_dir)
    cfg = config_from_dict(fam, config.get(fam.name))
    meta = fmm.random.key(0).to("meta")
    like = fam.init(cfg, meta)
    params = saved.params(like=like)
    names = set((saved.manifest or {}).get("files", {})) | {p.name for p in saved.path.iterdir()}
    tokenizer = None
    if checkpoint.TOKENIZER_FILE in names:
        tokenizer = tokenizer_from_json(saved.text(checkpoint.TOKENIZER_FILE))
    model_state = None
    if fam.init_state is not None and MODEL_STATE_FILE in names:
        state_like = fam.init_state(cfg, like, meta)
        model_state = _to(saved.params(MODEL_STATE_FILE, like=state_like), device)
    return Run(Path(run_dir), fam, cfg, _to(params, device), config, tokenizer, model_state, saved)
