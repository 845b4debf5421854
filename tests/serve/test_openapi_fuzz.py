"""The server against its own OpenAPI document: schemathesis, every check, no failure.

schemathesis reads ``/openapi.json`` from a live server on loopback and sends what the
document allows (examples, boundary values, random bodies: the positive cases) and what it
forbids (wrong types, missing or extra fields, out-of-range values: the negative cases),
then checks each answer with all of its checks: never a 5xx, only documented status codes,
content types, headers and bodies, schema-valid requests accepted, schema-violating ones
refused, a 405 with ``Allow`` for any other method. So the document is as strict as the
server and the server as strict as the document.

A JSON schema cannot say "a decodable PNG", so the document gives encoded images their own
format (``png-or-jpeg-base64``) and this test teaches schemathesis to draw real ones (PNG or
JPEG, any colour mode, 1 to 24 pixels a side): the server must accept every one.

Two servers: a CLIP run with a store (every operation; /v1/generate is its documented 404)
and an mmgpt run (/v1/generate, each server-sent event checked against the document).
The examples are drawn from a fixed seed (``FMM_FUZZ_SEED`` picks another, ``FMM_FUZZ_EXAMPLES``
how many per operation) so that CI is repeatable; ~8 s on 2 cores.
"""

import argparse
import base64
import io
import os

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from tests.serve._runs import running, tiny_clip_run, tiny_mmgpt_run  # noqa: E402
from train.recipes import serve  # noqa: E402
from train.serve import schemas  # noqa: E402
from train.serve.app import create_app  # noqa: E402

SEED = int(os.environ.get("FMM_FUZZ_SEED", "0"))
EXAMPLES = int(os.environ.get("FMM_FUZZ_EXAMPLES", "25"))
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")


@st.composite
def encoded_images(draw) -> str:
    """A base64 PNG (any of ``MODES``) or JPEG (grey or RGB) of random pixels."""
    width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    pixels = draw(st.binary(min_size=3 * width * height, max_size=3 * width * height))
    image = Image.frombytes("RGB", (width, height), pixels)
    if draw(st.booleans()):
        kind, image = "JPEG", image.convert(draw(st.sampled_from(("L", "RGB"))))
    else:
        mode = draw(st.sampled_from(MODES))
        kind, image = "PNG", (image.convert("L") if mode == "I;16" else image).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return base64.b64encode(buffer.getvalue()).decode()


schemathesis.openapi.format(schemas.IMAGE_FORMAT, encoded_images())


def _serve(run_dir, *flags):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--ckpt", str(run_dir), *flags])
    service = serve.build_service(args)
    limits = serve.limits_of(args)
    return service, running(create_app(service, limits=limits), limits=limits)


@pytest.fixture(scope="module")
def clip_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    service, serving = _serve(tiny_clip_run(root / "clip"), "--store", str(root / "s.sqlite"))
    with serving as url:
        yield url
    service.store.close()


def _fuzz(url: str, cwd, monkeypatch, *only: str) -> None:
    from click.testing import CliRunner
    from schemathesis.cli import schemathesis as cli

    argv = [
        "run", f"{url}/openapi.json", "--checks", "all", "--max-examples", str(EXAMPLES),
        "--seed", str(SEED), "--generation-database", "none", "--workers", "1", "--no-color",
        "--phases", "examples,coverage,fuzzing", *only,
    ]  # fmt: skip
    monkeypatch.chdir(cwd)  # schemathesis keeps a cache folder in the working directory
    result = CliRunner().invoke(cli, argv)
    summary = result.output[result.output.rfind("=== SUMMARY") :]
    assert result.exit_code == 0, result.output[-20_000:]
    assert "Tested:" in summary and "failure" not in summary, summary


def test_every_schemathesis_check_passes_on_every_operation(clip_url, tmp_path, monkeypatch):
    _fuzz(clip_url, tmp_path, monkeypatch)


def test_generation_streams_what_its_document_says(tmp_path, monkeypatch):
    # An mmgpt server: /v1/generate runs (its fixed code count is in the document), and
    # every server-sent event's data is checked against GenerationEvent.
    _, serving = _serve(tiny_mmgpt_run(tmp_path / "mmgpt"), "--max-generations", "8")
    with serving as url:
        _fuzz(url, tmp_path, monkeypatch, "--include-path", "/v1/generate")
