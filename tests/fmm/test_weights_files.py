"""Weights files never run code: TorchScript archives, torch.save files, safetensors.

The crafted archive is a scripted module whose ``__setstate__`` creates a file when
``torch.jit.load`` runs it; a control test shows that it really does, so the tests that
assert nothing was written can fail. The hand-made pickles call ``os.system``,
``builtins.eval`` and ``subprocess.Popen``; plain ``pickle.loads`` of each is shown to run.
"""

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from fmm.convert import ConversionError
from fmm.io import read_state_dict
from models import gpt
from models.clip import convert as clip_convert
from tests.reference import reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]


class WritesFileOnLoad(torch.nn.Module):
    """Its scripted ``__setstate__`` creates ``path`` (``torch.from_file`` with
    ``shared=True`` makes the file): what a malicious ``.pt`` can do at load time."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.path = state[1]
        self.training = state[2]
        # The sum keeps the compiler from dropping the call; from_file's zeros add nothing.
        self.weight = state[0] + torch.from_file(self.path, True, 3)


class Odd(torch.nn.Module):
    """Parameters, buffers (one not persistent, one a strided view), fp16 and int64 tensors,
    a missing bias, a tied weight and nested containers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(7, 5)
        self.head = torch.nn.Linear(5, 7, bias=False)
        self.head.weight = self.embed.weight
        self.blocks = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
        self.scale = torch.nn.Parameter(torch.randn(3, dtype=torch.float16))
        self.register_buffer("window", torch.arange(12.0).reshape(3, 4)[:, 1:3])
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.blocks(x) * self.scale.float() + self.head(x).sum() + self.window.sum()


def _oc_clip(oc):
    vision = dict(image_size=32, patch_size=16, width=64, layers=1, head_width=64)
    text = dict(context_length=8, vocab_size=50, width=64, heads=1, layers=1)
    return oc.model.CLIP(32, vision, text, quick_gelu=True).eval()


def _clip_inputs():
    return torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 8))


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """Scripted and traced archives of a plain module and of a small open_clip CLIP."""
    folder = tmp_path_factory.mktemp("archives")
    odd = Odd().eval()
    ids = torch.tensor([1, 2, 3])
    oc_clip = _oc_clip(reference("open_clip"))
    made = {
        "odd-scripted": torch.jit.script(odd),
        "odd-traced": torch.jit.trace(odd, ids),
        "open_clip-scripted": torch.jit.script(oc_clip),
        "open_clip-traced": torch.jit.trace(oc_clip, _clip_inputs()),
    }
    for name, module in made.items():
        module.save(folder / f"{name}.pt")
    return {name: folder / f"{name}.pt" for name in made}


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory) -> tuple[Path, dict]:
    """An archive in the layout of OpenAI's original CLIP files (what open_clip's
    ``load_openai_model`` reads): traced with ``encode_image`` and ``encode_text``, the
    sizes as int64 buffers, the attention mask a plain attribute, matrices in fp16.
    Returns the path and the eager model's state dict."""
    oc = reference("open_clip")
    model = _oc_clip(oc)
    mask = model.attn_mask
    del model._buffers["attn_mask"], model.context_length, model.vocab_size
    model.attn_mask = mask
    for name, value in (("input_resolution", 32), ("context_length", 8), ("vocab_size", 50)):
        model.register_buffer(name, torch.tensor(value))
    images, tokens = _clip_inputs()
    traced = torch.jit.trace_module(model, {"encode_image": images, "encode_text": tokens})
    oc.model.convert_weights_to_fp16(model)  # OpenAI's partial fp16, applied after tracing
    eager = model.state_dict()
    for name, tensor in [*traced.named_parameters(), *traced.named_buffers()]:
        tensor.data = eager[name]
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    traced.save(path)
    return path, eager


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """``(archive, marker)``: loading the archive with ``torch.jit.load`` creates ``marker``."""
    marker = tmp_path / "written-at-load"
    archive = tmp_path / "crafted.pt"
    torch.jit.script(WritesFileOnLoad(str(marker))).save(archive)
    assert not marker.exists()
    return archive, marker


def _one_line_error(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def _assert_same_state_dicts(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for k, theirs_k in theirs.items():
        assert ours[k].dtype == theirs_k.dtype, k
        assert ours[k].shape == theirs_k.shape and ours[k].stride() == theirs_k.stride(), k
        assert torch.equal(ours[k], theirs_k), k


# ----------------------------------------------------------------- the crafted archive


def test_control_torch_jit_load_of_the_crafted_archive_writes_a_file(crafted):
    archive, marker = crafted
    torch.jit.load(archive)
    assert marker.exists()


def _gpt_directory(archive: Path) -> Path:
    folder = archive.parent / "gpt2"
    folder.mkdir()
    hf = dict(
        model_type="gpt2",
        vocab_size=50,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        layer_norm_epsilon=1e-5,
    )
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "pytorch_model.bin").write_bytes(archive.read_bytes())
    return folder / "pytorch_model.bin"


def _loader(name: str, archive: Path):
    """``(the file the error must name, a call that loads the archive)`` for each entry point."""
    if name == "read_state_dict":
        return archive, lambda: read_state_dict(archive)
    if name == "clip.load_pretrained":
        return archive, lambda: clip_convert.load_pretrained(archive, format="open_clip")
    bin_file = _gpt_directory(archive)
    return bin_file, lambda: gpt.load_pretrained(bin_file.parent)


@pytest.mark.parametrize(
    "loader", ["read_state_dict", "clip.load_pretrained", "gpt.load_pretrained"]
)
def test_crafted_archive_is_refused_and_nothing_is_written(crafted, loader):
    archive, marker = crafted
    path, load = _loader(loader, archive)
    with pytest.raises(ConversionError) as err:
        load()
    message = _one_line_error(err, path)
    assert "WritesFileOnLoad defines __setstate__" in message
    assert not marker.exists()


def _rewrite(src: Path, dst: Path, *, replace=None, drop=()) -> Path:
    """A copy of the archive ``src`` with entries (named relative to its root) replaced, and
    those starting with one of ``drop`` left out."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            relative = info.filename.split("/", 1)[1]
            if not relative.startswith(drop):
                zout.writestr(info.filename, replace.get(relative, zin.read(info)))
    return dst


def _calls(module: str, name: str, *args) -> bytes:
    """A protocol-2 pickle whose load calls ``module.name(*args)``: GLOBAL, args, REDUCE."""
    arguments = pickle.dumps(args, protocol=2)[2:-1]  # without its PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + arguments + b"R."


PAYLOADS = {
    "os.system": lambda marker: _calls("os", "system", f"touch {marker}"),
    "builtins.eval": lambda marker: _calls("builtins", "eval", f"open({str(marker)!r}, 'w')"),
    "subprocess.Popen": lambda marker: _calls("subprocess", "Popen", ["touch", str(marker)]),
}


@pytest.mark.parametrize("global_name", PAYLOADS)
def test_data_pkl_naming_a_dangerous_global_is_refused_by_name(tmp_path, archives, global_name):
    marker = tmp_path / "ran"
    payload = PAYLOADS[global_name](marker)
    result = pickle.loads(payload)  # control: an ordinary unpickler runs it
    if global_name == "subprocess.Popen":
        result.wait()
    assert marker.exists()
    marker.unlink()

    path = _rewrite(archives["odd-scripted"], tmp_path / "evil.pt", replace={"data.pkl": payload})
    with pytest.raises(ConversionError) as err:
        read_state_dict(path)
    assert f"refers to {global_name}, which a weights file may not use" in _one_line_error(
        err, path
    )
    assert not marker.exists()


# ----------------------------------------------------------- archives read as torch does


@pytest.mark.parametrize(
    "name", ["odd-scripted", "odd-traced", "open_clip-scripted", "open_clip-traced"]
)
def test_archive_reads_equal_to_torch_jit_load_state_dict(archives, name):
    _assert_same_state_dicts(
        read_state_dict(archives[name]), torch.jit.load(archives[name]).state_dict()
    )


def test_tied_weights_stay_one_storage(archives):
    sd = read_state_dict(archives["odd-scripted"])
    assert sd["head.weight"].data_ptr() == sd["embed.weight"].data_ptr()


def test_openai_layout_archive_goes_through_the_open_clip_converter(openai_archive):
    path, eager = openai_archive
    sd = read_state_dict(path)
    _assert_same_state_dicts(sd, torch.jit.load(path).state_dict())
    assert {"input_resolution", "context_length", "vocab_size"} <= sd.keys()
    assert sd["visual.conv1.weight"].dtype == torch.float16
    # open_clip's own reader of OpenAI state dicts accepts the result, and so do we.
    reference("open_clip").model.build_model_from_openai_state_dict(dict(sd))
    params, cfg = clip_convert.load_pretrained(path, format="open_clip")
    assert (cfg.image_size, cfg.image_width, cfg.text_width, cfg.vocab_size) == (32, 64, 64, 50)
    expected = clip_convert.to_open_clip(clip_convert.from_open_clip(eager, cfg), cfg)
    _assert_same_state_dicts(clip_convert.to_open_clip(params, cfg), expected)


# --------------------------------------------------------- torch.save files, safetensors


def _state_dict() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.randn(3, 5), "a.bias": torch.randn(3).half(), "n": torch.tensor(4)}


@pytest.mark.parametrize(
    ("saved", "legacy"),
    [("plain", False), ("plain", True), ("wrapped", False), ("wrapped", True)],
)
def test_torch_save_state_dict_files_read_as_saved(tmp_path, saved, legacy):
    sd = _state_dict()
    obj = sd if saved == "plain" else {"state_dict": sd, "epoch": 3, "name": "run"}
    path = tmp_path / "weights.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    _assert_same_state_dicts(read_state_dict(path), sd)


def test_torch_save_of_a_module_is_refused_naming_its_class(tmp_path):
    path = tmp_path / "module.bin"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(ConversionError) as err:
        read_state_dict(path)
    message = _one_line_error(err, path)
    assert "holds a pickled torch.nn.modules.linear.Linear" in message
    assert "state_dict()" in message


def test_torch_save_of_something_else_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    with pytest.raises(ConversionError, match="holds a list, not a state dict"):
        read_state_dict(path)
    torch.save({"w": torch.ones(2), "step": 7}, path)
    with pytest.raises(ConversionError, match=r"not a state dict of tensors: \['step'\]"):
        read_state_dict(path)


def test_safetensors_file_reads(tmp_path):
    from safetensors.torch import save_file

    sd = _state_dict()
    save_file(sd, tmp_path / "model.safetensors")
    loaded = read_state_dict(tmp_path / "model.safetensors")
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype for k in sd)


# -------------------------------------------------------------- malformed archives


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


MALFORMED = {
    "truncated": (_truncated, "cannot read weights file"),
    "garbage data.pkl": (
        lambda src, dst: _rewrite(src, dst, replace={"data.pkl": b"\x80\x02not a pickle"}),
        "data.pkl cannot be unpickled",
    ),
    "missing storage": (
        lambda src, dst: _rewrite(src, dst, drop=("data/0",)),
        r"a storage record names data/0, which is not in the archive",
    ),
    "short storage": (
        lambda src, dst: _rewrite(src, dst, replace={"data/0": b"\0" * 4}),
        r"data/0 holds 4 bytes, but its record says \d+ ",
    ),
    "no module": (
        lambda src, dst: _rewrite(src, dst, replace={"data.pkl": pickle.dumps({"w": 1}, 2)}),
        "data.pkl holds a dict, not a scripted module",
    ),
    "unknown class": (
        lambda src, dst: _rewrite(src, dst, drop=("code/",)),
        r"class __torch__\.\S*Odd is not defined under code/",
    ),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_malformed_archive_is_a_one_line_error(tmp_path, archives, damage):
    make, expected = MALFORMED[damage]
    path = make(archives["odd-scripted"], tmp_path / "damaged.pt")
    with pytest.raises(ConversionError, match=expected) as err:
        read_state_dict(path)
    _one_line_error(err, path)
