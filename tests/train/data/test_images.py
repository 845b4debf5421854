"""train.data.images: every image mode decodes to the RGB a person sees; broken, bomb and
empty images are BadSamples; the transforms' shapes, statistics and determinism."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.images import (
    BadSample,
    center_crop,
    decode,
    eval_transform,
    resize_shorter,
    train_transform,
)
from train.data.transforms import OPENAI_MEAN, OPENAI_STD


def _encode(image: Image.Image, format: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **save)
    return out.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_rgb_round_trips_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = decode(_encode(Image.fromarray(rgb)), where="x.png")
    assert image.size == (7, 5)
    np.testing.assert_array_equal(_pixels(image), rgb)


@pytest.mark.parametrize("mode", ["L", "1", "CMYK"])
def test_modes_without_alpha_convert_as_pil_does(mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8))
    source = rgb.convert(mode)
    data = _encode(source, "JPEG" if mode == "CMYK" else "PNG")
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_array_equal(_pixels(decode(data, where="x")), np.asarray(expected))


def test_grey_is_the_same_value_in_every_channel():
    grey = Image.fromarray(np.arange(30, dtype=np.uint8).reshape(5, 6) * 8, "L")
    out = _pixels(decode(_encode(grey), where="g.png"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], np.asarray(grey))


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (4, 3), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent: white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half black over white: grey
    out = _pixels(decode(_encode(rgba), where="a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert all(abs(int(v) - 127) <= 1 for v in out[0, 1])
    assert tuple(out[2, 3]) == (200, 10, 10)
    la = Image.new("LA", (2, 2), (0, 0))
    assert tuple(_pixels(decode(_encode(la), where="la.png"))[1, 1]) == (255, 255, 255)


def test_palette_with_a_transparent_index_is_white_there():
    p = Image.new("P", (3, 2), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.putpixel((2, 1), 0)
    out = _pixels(decode(_encode(p, transparency=0), where="p.png"))
    assert tuple(out[0, 0]) == (10, 200, 30)
    assert tuple(out[1, 2]) == (255, 255, 255)
    # Without transparency, index 0 is its palette colour: black.
    plain = _pixels(decode(_encode(p), where="p.png"))
    assert tuple(plain[1, 2]) == (0, 0, 0)


def test_16_bit_grey_scales_to_8_bit_rather_than_clipping():
    values = np.array([[0, 257, 32896], [65535, 1000, 65278]], dtype=np.uint16)
    data = _encode(Image.fromarray(values))  # a 16-bit grey PNG
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = _pixels(decode(data, where="depth.png"))[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 128], [255, 4, 254]])


def test_exif_orientation_is_applied():
    # 6 = "rotate 90 clockwise to view": a 4x2 stored image shows as 2 wide, 4 tall, and the
    # stored top-left pixel lands at the top right.
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 2, 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode(_encode(stored, "PNG", exif=exif), where="phone.png")
    assert image.size == (2, 4)
    assert tuple(_pixels(image)[0, 1]) == (255, 0, 0)
    assert tuple(_pixels(image)[3, 0]) == (0, 0, 255)


def test_exif_rotated_jpeg():
    stored = Image.new("RGB", (64, 32), (250, 250, 250))
    stored.paste((255, 0, 0), (0, 0, 32, 16))  # red top-left quarter
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 counter-clockwise: stored top-left -> bottom-left
    image = decode(_encode(stored, "JPEG", exif=exif, quality=95), where="cam.jpg")
    assert image.size == (32, 64)
    r, g, _ = _pixels(image)[56, 4].astype(int)
    assert r > 200 and g < 60


def test_truncated_jpeg_is_a_bad_sample():
    data = _encode(Image.new("RGB", (64, 48), (1, 2, 3)), "JPEG")
    with pytest.raises(BadSample) as info:
        decode(data[: len(data) // 2], where="half.jpg")
    assert info.value.where == "half.jpg"
    assert "half.jpg: cannot decode" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"0" * 40])
def test_unreadable_bytes_are_bad_samples(data):
    with pytest.raises(BadSample, match=r"^x: cannot decode"):
        decode(data, where="x")


def _png(width: int, height: int, value: int = 0) -> bytes:
    """A grey PNG of one value, compressed row by row: huge images stay a few hundred kB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    pack = zlib.compressobj(9)
    row = b"\x00" + bytes([value]) * width  # filter byte, then the pixels
    body = b"".join(pack.compress(row) for _ in range(height)) + pack.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def test_a_png_bomb_is_refused_before_decoding():
    # 9000 x 9000: past MAX_PIXELS (8192^2) but below PIL's own limit, so ours refuses it.
    bomb = _png(9000, 9000)
    assert len(bomb) < 1_000_000
    with pytest.raises(BadSample, match="9000x9000 pixels is more than the limit of 67108864"):
        decode(bomb, where="bomb.png")
    small = _png(300, 200, 7)
    image = decode(small, where="ok.png")
    assert image.size == (300, 200) and tuple(_pixels(image)[5, 5]) == (7, 7, 7)
    with pytest.raises(BadSample, match="more than the limit of 10000"):
        decode(small, where="ok.png", max_pixels=10_000)


@pytest.mark.parametrize("side", [10_000, 14_000])  # PIL's warning, then PIL's error
def test_past_pils_own_limit_is_a_bad_sample_too(side):
    with pytest.raises(BadSample, match=r"^bomb.png: a decompression bomb"):
        decode(_png(side, side), where="bomb.png", max_pixels=10**10)


def test_zero_size_image_is_a_bad_sample():
    with pytest.raises(BadSample, match=r"zero-size|cannot decode"):
        decode(_png(0, 5), where="empty.png")


def test_bad_sample_pickles_for_workers():
    error = pickle.loads(pickle.dumps(BadSample("a.jpg", "truncated")))
    assert (error.where, error.reason, str(error)) == ("a.jpg", "truncated", "a.jpg: truncated")


def test_draft_decodes_a_large_jpeg_at_a_fraction_but_never_below_the_size():
    data = _encode(Image.new("RGB", (1000, 700), (90, 120, 30)), "JPEG")
    assert decode(data, where="x").size == (1000, 700)
    assert decode(data, where="x", draft=224).size == (500, 350)  # 1/4 would be 175 < 224
    assert decode(data, where="x", draft=100).size == (250, 175)
    assert decode(data, where="x", draft=700).size == (1000, 700)
    png = _encode(Image.new("RGB", (1000, 700)))
    assert decode(png, where="x", draft=100).size == (1000, 700)  # only JPEGs have a draft


@pytest.mark.parametrize("size", [(7, 5), (5, 13), (300, 41), (32, 32)])
def test_eval_transform_is_resize_then_center_crop(size):
    image = Image.fromarray(
        np.random.default_rng(2).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    )
    out = eval_transform(image, size=9, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert out.shape == (3, 9, 9) and out.dtype == torch.float32
    expected = np.asarray(center_crop(resize_shorter(image, 9), 9), dtype=np.float32) / 255
    torch.testing.assert_close(
        out, (torch.from_numpy(expected).permute(2, 0, 1) - 0.5) / 0.25, atol=0, rtol=0
    )


# 5 x 13 is narrower than any allowed aspect: every try fails, so the crop is the center one.
@pytest.mark.parametrize("size, varies", [((7, 5), True), ((5, 13), False), ((64, 64), True)])
def test_train_transform_shape_and_determinism_per_generator(size, varies):
    rgb = np.random.default_rng(3).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(rgb)

    def crop(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return train_transform(image, size=11, mean=OPENAI_MEAN, std=OPENAI_STD, generator=g)

    first = crop(5)
    assert first.shape == (3, 11, 11) and first.dtype == torch.float32
    assert torch.equal(first, crop(5))
    assert any(not torch.equal(first, crop(s)) for s in range(6, 12)) == varies


def test_train_crop_covers_90_to_100_percent_of_the_area():
    from train.data.images import _crop_box

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, w, h = _crop_box(640, 480, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), generator=g)
        assert 0 <= left <= 640 - w and 0 <= top <= 480 - h
        assert 0.89 <= w * h / (640 * 480) <= 1.0
        assert 3 / 4 - 0.01 <= w / h <= 4 / 3 + 0.01


def test_constant_image_normalises_to_mean_and_std():
    image = Image.new("RGB", (20, 17), (255, 0, 128))
    g = torch.Generator().manual_seed(0)
    out = train_transform(image, size=8, mean=(0.5, 0.0, 0.25), std=(0.5, 1.0, 0.25), generator=g)
    assert torch.allclose(out[0], torch.tensor(1.0))
    assert torch.allclose(out[1], torch.tensor(0.0))
    assert torch.allclose(out[2], torch.tensor((128 / 255 - 0.25) / 0.25), atol=1e-6)
