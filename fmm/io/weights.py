"""Reading weights files without running code: one home for every foreign weights format.

:func:`read_state_dict` reads ``.safetensors``, ``torch.save`` files (with
``weights_only=True``) and TorchScript archives (with :mod:`fmm.io.torchscript`, never
``torch.jit.load``). Converters (:mod:`fmm.convert`) turn what it returns into our trees.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fmm.convert import ConversionError
from fmm.io.torchscript import ArchiveError, is_torchscript_archive, read_torchscript_state_dict

__all__ = ["read_state_dict"]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state dict in a weights file, read without running any code.

    By file:

    - ``.safetensors``: read by ``safetensors``.
    - a TorchScript archive (``torch.jit.save``; OpenAI's original CLIP ``.pt`` files): read
      by :func:`fmm.io.torchscript.read_torchscript_state_dict`, equal to
      ``torch.jit.load(path).state_dict()`` but never compiling or calling the archive's
      code (``torch.jit.load`` would run a scripted ``__setstate__``).
    - anything else (``torch.save`` files, zip or legacy: ``.pt``, ``.pth``, ``.bin``):
      ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only. A
      file holding a pickled ``nn.Module`` or other objects is refused: save
      ``module.state_dict()`` instead.

    A dict wrapping the state dict under ``"state_dict"``, ``"model"`` or ``"module"`` (as
    training checkpoints do) is unwrapped. Tensors are on the CPU.
    Raises ``FileNotFoundError`` if ``path`` is not a file, and :class:`ConversionError`
    (one line naming the file and what is wrong) for a file that cannot be read, asks for
    code to run, or does not hold a state dict of tensors.

    Example::

        sd = read_state_dict("ViT-B-32.pt")          # {"visual.conv1.weight": ..., ...}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if is_torchscript_archive(path):
            obj = read_torchscript_state_dict(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ArchiveError as e:
        raise ConversionError(
            f"cannot read weights file {path} (a TorchScript archive): {_one_line(e)}"
        ) from e
    except pickle.UnpicklingError as e:  # weights_only met something it will not rebuild
        raise ConversionError(_weights_only_refusal(path, e)) from e
    except Exception as e:  # the file's own reader says what is wrong; we name the file
        raise ConversionError(
            f"cannot read weights file {path}: {type(e).__name__}: {_one_line(e)}"
        ) from e
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ConversionError(f"{path} is not a state dict of tensors: {not_tensors[:5]} are not")
    return dict(obj)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _weights_only_refusal(path: Path, error: pickle.UnpicklingError) -> str:
    """One line from torch's several-paragraph weights_only error (which also suggests
    ``weights_only=False``: the very thing we must not do)."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"{path} holds a pickled {found[1]}, not only tensors: refused, since loading it "
            "would run its code (save its state_dict() instead)"
        )
    reason = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    detail = reason[1] if reason else _one_line(error)
    return (
        f"cannot read weights file {path}: torch.load(weights_only=True) refused it: {detail:.200}"
    )
