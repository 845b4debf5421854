"""Argument checks shared by the tokenizers: clear errors naming the bad argument."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def as_texts(texts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a str or a sequence of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] must be str, got {type(text).__name__}: {text!r}")
    return list(texts)


def as_text(text: str, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be str, got {type(text).__name__}: {text!r}")
    return text


def as_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() != 1:
            raise ValueError(
                f"ids must be an integer tensor [seq], got dtype {ids.dtype} shape {tuple(ids.shape)}"
            )
        ids = ids.tolist()
    ids = list(ids)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ValueError(f"ids must be ints in [0, {vocab_size}), got {i!r}")
    return ids


def existing_file(path: str | Path, name: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist or is not a file")
    return path


def check_length(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
