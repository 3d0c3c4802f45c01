"""The decoded-bytes budget: images are limited by the memory decoding takes, not by pixels.

A 16-bit PNG or a 32-bit float TIFF under the 40 MP pixel limit used to take ~1 GiB to
decode; now the peak (pixels in Pillow's storage, decoder buffers, each conversion to 8-bit
RGB, the resize) is estimated from the header and refused before decoding when it is over
``max_decoded_bytes``. Large JPEGs are decoded at a reduced scale (``DRAFT_FACTOR``).

Peak memory is measured as the growth of the process's RSS high-water mark (VmHWM, reset
through /proc/self/clear_refs) in a fresh Python process: tracemalloc does not see Pillow's
pixel buffers, which it allocates with plain malloc.
"""

from __future__ import annotations

import functools
import io
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile_cases import encode, lesion_image, png_bomb
from nitrolesion.errors import ImageError
from nitrolesion.model.preprocess import (
    DEFAULT_INPUT_SIZE, DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS, DRAFT_FACTOR, MIB,
    decode_image, decoded_bytes_estimate, preprocess_image, scale_pixels)

ROOT = Path(__file__).resolve().parents[1]

#: A refusal from the header must be this fast (the old path decoded for 2.4-5.5 s first).
REFUSAL_SECONDS = 0.5
#: Side of the hostile images: 36 MP, under DEFAULT_MAX_PIXELS; 16-bit and float decode to
#: ~172 MiB at their peak, over DEFAULT_MAX_DECODED_BYTES.
HOSTILE_SIDE = 6000
#: A 16-bit image that fits the budget (25 MP, ~125 MiB peak); the old path took ~660 MB.
ACCEPTED_16BIT_SIDE = 5000
#: RSS growth allowed while refusing a hostile image from its header: the header parse and
#: allocator noise, far below the hundreds of MiB a decode would take.
REFUSAL_PEAK_BYTES = 16 * MIB
#: An estimate may overcharge (it is a bound), but not by more than this factor.
ESTIMATE_SLACK = 2.5
#: Drafted vs full decode of the same JPEG, in 8-bit grey levels of the 192 x 192 model
#: input. Measured on 60 HAM10000 test images upscaled x8/x16/x24: max 3, mean <= 0.16
#: (re-encoding the same photo at JPEG quality 90 instead of 95 moves it as much).
DRAFT_MAX_LEVELS = 4
DRAFT_MEAN_LEVELS = 0.25


# -- hand-built valid images: big in pixels, small in bytes --------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_gray16(width: int, height: int, row=None) -> bytes:
    """A complete 16-bit grayscale PNG; ``row(y)`` gives big-endian samples (default 0)."""
    compressor = zlib.compressobj(6)
    blank = b"\x00" + bytes(2 * width)
    idat = b"".join(compressor.compress(b"\x00" + row(y) if row else blank) for y in range(height))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)  # 16-bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def tiff_float32(width: int, height: int, value: float = 0.5, rows_per_strip: int = 64) -> bytes:
    """A complete little-endian TIFF of 32-bit float samples, deflate-compressed strips."""
    row = struct.pack("<f", value) * width
    compressed = {}
    strips = []
    for top in range(0, height, rows_per_strip):
        rows = min(rows_per_strip, height - top)
        if rows not in compressed:
            compressed[rows] = zlib.compress(row * rows)
        strips.append(compressed[rows])
    count = len(strips)
    entries_at = 8
    arrays_at = entries_at + 2 + 10 * 12 + 4
    data_at = arrays_at + 8 * count
    offsets, position = [], data_at
    for strip in strips:
        offsets.append(position)
        position += len(strip)

    def entry(tag, kind, values):
        if kind == 3 and len(values) == 1:  # SHORT, in the value field
            return struct.pack("<HHIHH", tag, 3, 1, values[0], 0)
        return struct.pack("<HHII", tag, 4, len(values), values[0])

    ifd = [entry(256, 4, [width]), entry(257, 4, [height]), entry(258, 3, [32]),
           entry(259, 3, [8]),  # Adobe deflate
           entry(262, 3, [1]),  # BlackIsZero
           struct.pack("<HHII", 273, 4, count, arrays_at if count > 1 else offsets[0]),
           entry(277, 3, [1]), entry(278, 4, [rows_per_strip]),
           struct.pack("<HHII", 279, 4, count, arrays_at + 4 * count if count > 1 else len(strips[0])),
           entry(339, 3, [3])]  # SampleFormat: IEEE float
    arrays = (struct.pack(f"<{count}I", *offsets)
              + struct.pack(f"<{count}I", *(len(s) for s in strips))) if count > 1 else b"\x00" * 8 * count
    return (b"II*\x00" + struct.pack("<I", entries_at) + struct.pack("<H", len(ifd)) + b"".join(ifd)
            + struct.pack("<I", 0) + arrays + b"".join(strips))


@pytest.fixture(scope="module")
def hostile_images() -> dict[str, bytes]:
    """Under the pixel limit, over the byte budget: 36 MP 16-bit PNG and float TIFF."""
    return {"png-16-bit": png_gray16(HOSTILE_SIDE, HOSTILE_SIDE),
            "tiff-float32": tiff_float32(HOSTILE_SIDE, HOSTILE_SIDE)}


def test_hand_built_images_are_valid():
    # The writers above make real files, so the refusals below are about size, not damage.
    ramp = lambda y: b"".join(struct.pack(">H", x * 1040) for x in range(64))  # noqa: E731
    png = Image.open(io.BytesIO(png_gray16(64, 48, ramp)))
    assert png.mode == "I;16" and png.size == (64, 48)
    gray = np.asarray(decode_image(png_gray16(64, 48, ramp)))[..., 0]
    assert gray[0, 0] == 0 and gray[10, 63] == round(63 * 1040 / 257)
    tiff = Image.open(io.BytesIO(tiff_float32(64, 48, 0.25, rows_per_strip=16)))
    assert tiff.mode == "F" and tiff.size == (64, 48)
    assert np.all(np.asarray(tiff) == 0.25)
    assert tuple(decode_image(tiff_float32(64, 48, 0.25, rows_per_strip=16)).getpixel((5, 5))) == (64, 64, 64)


@pytest.mark.parametrize("name", ["png-16-bit", "tiff-float32"])
def test_wide_image_under_the_pixel_limit_is_refused_from_its_header_fast(hostile_images, name):
    data = hostile_images[name]
    width, height = Image.open(io.BytesIO(data)).size
    assert width * height <= DEFAULT_MAX_PIXELS
    started = time.perf_counter()
    with pytest.raises(ImageError) as refused:
        preprocess_image(data)
    assert time.perf_counter() - started < REFUSAL_SECONDS
    message = str(refused.value)
    assert message.startswith("image would decode to ") and message.endswith(" MiB, limit 160.0 MiB")
    assert str(HOSTILE_SIDE) not in message and len(message) < 60
    assert decoded_bytes_estimate(data) > DEFAULT_MAX_DECODED_BYTES


@pytest.mark.parametrize("width, height", [(DEFAULT_MAX_PIXELS, 1), (1, DEFAULT_MAX_PIXELS)])
def test_degenerate_shapes_are_charged_for_rows_and_resize(width, height):
    # 40 MP exactly, so the pixel check passes: a 40-million-pixel row costs the PNG decoder
    # two rows of that width, a 40-million-pixel column costs the resize a 192-wide copy.
    with pytest.raises(ImageError, match=r"^image would decode to \d+\.\d MiB, limit 160\.0 MiB$"):
        preprocess_image(png_bomb(width, height))


def test_estimate_reads_only_the_header(hostile_images):
    for data in hostile_images.values():
        head = data[:4096]  # IHDR / first IFD and a little pixel data
        assert decoded_bytes_estimate(head) == decoded_bytes_estimate(data)
        started = time.perf_counter()
        decoded_bytes_estimate(data)
        assert time.perf_counter() - started < 0.05


def test_estimate_is_the_budget_preprocess_checks():
    # What the service reserves is exactly what preprocess_image then holds itself to.
    for data in (encode(lesion_image((400, 300)), "PNG"), encode(lesion_image(), "JPEG"),
                 png_gray16(300, 200)):
        need = decoded_bytes_estimate(data)
        assert preprocess_image(data, max_decoded_bytes=need).shape == (DEFAULT_INPUT_SIZE,) * 2 + (3,)
        with pytest.raises(ImageError, match="would decode to"):
            preprocess_image(data, max_decoded_bytes=need - 1)


def test_progressive_jpeg_is_charged_for_its_coefficients():
    # libjpeg keeps every DCT coefficient of a progressive file, at full size even when
    # drafting: 2 bytes per sample, 1.5 samples per pixel at 4:2:0.
    image = lesion_image((1600, 1200))
    baseline = encode(image, "JPEG", quality=90)
    progressive = encode(image, "JPEG", quality=90, progressive=True)
    coefficients = 2 * 1.5 * 1600 * 1200  # 100 x 75 MCUs of 6 blocks, 128 bytes each
    # Full decode (size=None): loading is the peak, so the buffers add up exactly.
    assert decoded_bytes_estimate(progressive, None) - decoded_bytes_estimate(baseline, None) == coefficients
    assert decoded_bytes_estimate(progressive) > coefficients  # drafting does not shrink them


def _move_exif_after_pixels(png: bytes) -> bytes:
    start = png.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(png[start:start + 4], "big")
    iend = len(png) - 12
    return png[:start] + png[end:iend] + png[start:end] + png[iend:]


def test_png_exif_after_the_pixels_is_applied_and_charged():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = lesion_image((300, 200))
    plain = encode(image, "PNG")
    late = _move_exif_after_pixels(encode(image, "PNG", exif=exif.tobytes()))
    assert "exif" not in Image.open(io.BytesIO(late)).info  # not known before load()
    assert decode_image(late).size == (200, 300)
    assert decoded_bytes_estimate(late, None) > decoded_bytes_estimate(plain, None)


# -- JPEG draft --------------------------------------------------------------------------
def model_input(image: Image.Image, size: int = DEFAULT_INPUT_SIZE) -> np.ndarray:
    """preprocess_image's resize and scaling of an already decoded image."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return scale_pixels(np.asarray(resized, dtype=np.uint8))


def check_draft(data: bytes, drafted_size: tuple[int, int]) -> None:
    drafted = decode_image(data, draft_size=DRAFT_FACTOR * DEFAULT_INPUT_SIZE)
    assert drafted.size == drafted_size
    assert min(drafted.size) >= DRAFT_FACTOR * DEFAULT_INPUT_SIZE
    # preprocess_image goes through that same draft...
    assert np.array_equal(preprocess_image(data), model_input(drafted))
    # ...and lands within a grey level or two of decoding every pixel.
    full = decode_image(data, max_decoded_bytes=1 << 40)
    levels = np.abs(model_input(full) - preprocess_image(data)) * 127.5
    assert levels.max() <= DRAFT_MAX_LEVELS and levels.mean() <= DRAFT_MEAN_LEVELS
    # and it costs what was decoded, not what was declared
    assert decoded_bytes_estimate(data) < decoded_bytes_estimate(data, None) / 4


def test_large_jpeg_is_decoded_through_draft():
    image = lesion_image((600, 450)).resize((4800, 3600), Image.Resampling.BICUBIC)
    check_draft(encode(image, "JPEG", quality=95), (600, 450))  # 1/8 scale


def test_draft_keeps_real_photos_within_tolerance(test_image_paths):
    for path in test_image_paths[:4]:
        photo = Image.open(path).convert("RGB")
        big = photo.resize((photo.width * 16, photo.height * 16), Image.Resampling.BICUBIC)
        check_draft(encode(big, "JPEG", quality=95), (big.width // 4, big.height // 4))


# -- measured peak memory ------------------------------------------------------------------
_PEAK_CHILD = r"""
import sys
from nitrolesion.errors import ImageError
from nitrolesion.model.preprocess import preprocess_image

def status(name):
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(name + ":"))

data, warm = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
preprocess_image(warm)  # imports, plugin registration, first-call allocations
with open("/proc/self/clear_refs", "w") as control:
    control.write("5")  # VmHWM := VmRSS
base = status("VmRSS")
try:
    preprocess_image(data)
    outcome = "decoded"
except ImageError as exc:
    outcome = str(exc)
print(status("VmHWM") - base)
print(outcome)
"""


def measured_peak(tmp_path: Path, data: bytes, warm: bytes) -> tuple[int, str]:
    """(peak RSS growth in bytes, "decoded" or the ImageError) of preprocess_image(data) in a
    fresh process, after decoding ``warm`` (a small image of the same kind)."""
    try:
        with open("/proc/self/clear_refs", "w") as control:
            control.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    (tmp_path / "image").write_bytes(data)
    (tmp_path / "warm").write_bytes(warm)
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(ROOT), str(tmp_path / "image"),
                          str(tmp_path / "warm")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    peak, outcome = out.stdout.splitlines()
    return int(peak), outcome


def test_hostile_images_are_refused_without_allocating(tmp_path, hostile_images):
    warm = png_gray16(64, 48)
    for name, data in hostile_images.items():
        peak, outcome = measured_peak(tmp_path, data, warm)
        assert outcome.startswith("image would decode to"), name
        assert peak < REFUSAL_PEAK_BYTES, f"{name}: {peak / MIB:.0f} MiB while refusing"


def test_accepted_sixteen_bit_image_stays_within_the_budget(tmp_path):
    # 25 MP of 16-bit grey: the old path converted through float64 (~26 bytes/pixel, ~660 MB).
    data = png_gray16(ACCEPTED_16BIT_SIDE, ACCEPTED_16BIT_SIDE)
    estimate = decoded_bytes_estimate(data)
    peak, outcome = measured_peak(tmp_path, data, png_gray16(64, 48))
    assert outcome == "decoded"
    assert peak <= estimate <= DEFAULT_MAX_DECODED_BYTES


@functools.lru_cache(maxsize=8)
def _smooth(width: int, height: int, channels: int, top: float, dtype) -> np.ndarray:
    """A smooth noisy picture; cached (nine cases draw the same 2000 x 1500 RGB one, 0.2 s
    each), so read-only."""
    y, x = np.mgrid[0:height, 0:width]
    base = (np.sin(x / 97.0) + np.cos(y / 61.0) + 2) / 4
    noise = np.random.default_rng(0).normal(0, 0.01, (height, width))
    plane = np.clip(base + noise, 0, 1) * top
    planes = [plane, plane[::-1], plane[:, ::-1], np.full_like(plane, 0.8 * top)][:channels]
    pixels = (planes[0] if channels == 1 else np.stack(planes, -1)).astype(dtype)
    pixels.flags.writeable = False
    return pixels


@pytest.fixture(scope="module", autouse=True)
def _forget_smooth_pictures():
    yield
    _smooth.cache_clear()  # ~50 MB the rest of the session does not need


def _png(image: Image.Image, **options) -> bytes:
    """PNG at zlib level 1: decoding, which is what is measured, inflates the same pixels
    through the same buffers at any level; level 6 took 0.4-1.7 s per image to encode."""
    return encode(image, "PNG", compress_level=1, **options)


def _rgb(width, height):
    return Image.fromarray(_smooth(width, height, 3, 255, np.uint8))


def _rotated_png(width, height):
    exif = Image.Exif()
    exif[0x0112] = 6
    return _png(_rgb(width, height), exif=exif.tobytes())


#: One image per decode path with its own costs; 2000 x 1500 so that pixels dominate.
PEAK_CASES = {
    "rgb-png": lambda w, h: _png(_rgb(w, h)),
    "rgba-png": lambda w, h: _png(Image.fromarray(_smooth(w, h, 4, 255, np.uint8))),
    "la-png": lambda w, h: _png(_rgb(w, h).convert("LA")),
    "p-transparency-png": lambda w, h: _png(_rgb(w, h).convert("P"), transparency=0),
    "gray16-png": lambda w, h: _png(Image.fromarray(_smooth(w, h, 1, 65535, np.uint16))),
    "exif-rotated-png": _rotated_png,
    "float-tiff-one-strip": lambda w, h: encode(Image.fromarray(_smooth(w, h, 1, 1.0, np.float32)),
                                                "TIFF", compression="tiff_deflate", strip_size=1 << 40),
    "rgb-tiff-lzw-one-strip": lambda w, h: encode(_rgb(w, h), "TIFF", compression="tiff_lzw",
                                                  strip_size=1 << 40),
    "cmyk-jpeg": lambda w, h: encode(_rgb(w, h).convert("CMYK"), "JPEG", quality=90),
    "progressive-444-jpeg": lambda w, h: encode(_rgb(w, h), "JPEG", quality=90, progressive=True,
                                                subsampling=0),
    "webp": lambda w, h: encode(_rgb(w, h), "WEBP", quality=80),
    "gif": lambda w, h: encode(_rgb(w, h).convert("P"), "GIF"),
}


@pytest.mark.parametrize("case", sorted(PEAK_CASES))
def test_estimate_bounds_the_measured_peak(tmp_path, case):
    data = PEAK_CASES[case](2000, 1500)
    estimate = decoded_bytes_estimate(data)
    peak, outcome = measured_peak(tmp_path, data, PEAK_CASES[case](64, 48))
    assert outcome == "decoded"
    assert peak <= estimate, f"{case}: measured {peak / MIB:.1f} MiB > estimate {estimate / MIB:.1f} MiB"
    assert estimate <= ESTIMATE_SLACK * peak, (
        f"{case}: estimate {estimate / MIB:.1f} MiB for a {peak / MIB:.1f} MiB peak")
