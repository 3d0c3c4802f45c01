"""The one image preprocessing function, shared by training, evaluation and the enclave.

Training (models/train.py), evaluation (models/evaluate.py) and inference in the enclave all
call :func:`preprocess_image`, so what the model sees cannot drift between them.

Steps: check the byte size, identify the format without decoding, check the declared pixel
count, work out from the header how many bytes decoding will occupy at its peak (see
:func:`decoded_bytes_estimate`) and refuse before decoding if that is over the budget,
decode the first frame (large JPEGs at a reduced scale, see ``DRAFT_FACTOR``), apply the EXIF
orientation, convert any mode (RGBA, LA, P, L, I;16, F, CMYK, ...) to 8-bit RGB, resize to the
model's square input with an antialiasing filter and scale to [-1, 1] as MobileNetV2 expects.

Every Pillow call that reads the submitted bytes runs inside one boundary that turns what
Pillow raises on corrupt input into :class:`~nitrolesion.errors.ImageError`; our own code
around it is outside, so a bug of ours still surfaces as a bug.
"""

from __future__ import annotations

import io
import math
import struct
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, TiffImagePlugin, UnidentifiedImageError

from nitrolesion.errors import ImageError

__all__ = [
    "ACCEPTED_FORMATS",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DRAFT_FACTOR",
    "decode_image",
    "decoded_bytes_estimate",
    "preprocess_image",
    "scale_pixels",
]

MIB = 1024 * 1024

#: Formats we decode. Fewer decoders means less attack surface; these cover what cameras,
#: dermatoscopes and phones produce.
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")

#: Largest encoded image accepted. A 24 MP JPEG from a dermatoscope is 5-12 MB; 20 MiB
#: leaves room for PNG/TIFF without letting one request pin much enclave memory.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

#: Largest declared image accepted, in pixels: a cheap sanity check on the header (40 MP
#: covers every current camera sensor). Memory is bounded by DEFAULT_MAX_DECODED_BYTES, not
#: by this: the same pixel count costs 1 to 20 bytes per pixel depending on mode and format.
DEFAULT_MAX_PIXELS = 40_000_000

#: Most bytes decoding one image may occupy at its peak (decoded pixels, the decoder's own
#: buffers, the conversions to 8-bit RGB and the resize), checked from the header before
#: any pixel is decoded. 160 MiB admits an 8-bit RGB PNG/TIFF up to ~39 MP (RGBA ~20 MP), a
#: 16-bit or float one up to ~32 MP, a baseline JPEG up to DEFAULT_MAX_PIXELS (drafted, see DRAFT_FACTOR) and
#: a progressive one up to 40 MP at 4:2:0 or ~26 MP at 4:4:4 (libjpeg holds its
#: coefficients); and it stays below what a 768 MiB enclave can spend on all requests together
#: (~179 MiB, see nitrolesion/memory_budget.py), so an image this limit accepts can be served.
DEFAULT_MAX_DECODED_BYTES = 160 * MIB

# Pillow's own bomb guard is global and raises before we can say what was declared; our
# per-call limits are stricter and checked from the header, before any pixel decodes.
Image.MAX_IMAGE_PIXELS = None

#: Input side of the shipped model; the model file is authoritative (see classifier).
DEFAULT_INPUT_SIZE = 192

#: A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling via Image.draft) only as
#: far as both sides stay >= DRAFT_FACTOR x the model input, so the antialiased resize still
#: averages >= 2 source pixels per output pixel. Measured on 60 HAM10000 test photos upscaled
#: x8/x16/x24: the 192 x 192 input moves by <= 3 grey levels (mean <= 0.16) and the model's
#: probabilities by <= 0.08, as much as re-encoding the photo at quality 90 instead of 95
#: does; a 4800 x 3600 photo decodes in 13 ms instead of 52 ms, into 1 MiB instead of 66 MiB.
DRAFT_FACTOR = 2

#: What Pillow raises on corrupt or hostile input. Image.open turns IndexError, TypeError,
#: KeyError, EOFError and struct.error into SyntaxError for the first frame only; walking to
#: later TIFF pages (n_frames), load() and EXIF parsing raise them as they are (a 2-page TIFF
#: whose page 2 names an unknown compression raises KeyError from n_frames). OverflowError and
#: ZeroDivisionError (ArithmeticError) come from absurd header values; MemoryError from a
#: decoder that still cannot allocate.
PILLOW_INPUT_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, TypeError,
                       IndexError, KeyError, ArithmeticError, MemoryError)

#: Bytes per pixel in Pillow's own storage (not the file's): RGB is stored as 4 bytes like
#: RGBA, LA/PA as 4, I;16 as 2 (measured as RSS per mode; the measured-peak tests in
#: tests/test_decode_budget.py fail if a mode is under-charged). Modes not listed are charged
#: the most any Pillow mode takes.
_STORAGE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2,
                  "I": 4, "F": 4}
_MAX_STORAGE_BYTES = 4

#: Modes converted to 8-bit by rescaling their value range, not by Pillow's clipping convert.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
#: Modes whose transparent pixels are flattened onto black.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

#: Side of the square tiles the rescale and alpha steps work on: their float64 scratch
#: (~40 bytes per pixel) stays near 2.6 MiB however large the image is.
_TILE = 256

#: Bytes charged per column of the decoded width for the decoders' row buffers (zlib's
#: previous/current row for PNG, libjpeg's MCU rows, BMP/GIF rows): at most 16 bytes per
#: pixel per row (32-bit float RGBA) times the 16 rows of a 4:2:0 JPEG MCU row. A normal
#: 6000-px-wide photo costs 1.5 MiB; a 40-million-by-1 bomb costs far over any budget.
_ROW_BYTES_PER_COLUMN = 256

#: Fixed cost of one decode beyond what scales with the image: decoder state, the conversion
#: tiles, the 192 x 192 resize output and model-input arrays, Python objects (measured peak
#: of preprocess_image on a tiny image: 0-1 MiB for PNG/JPEG/TIFF, 3 MiB for a first WebP).
_FIXED_BYTES = 4 * MIB

#: Pillow's WebP decoder keeps libwebp's canvas and previous-frame canvas (4 bytes/pixel
#: each) and a bytes copy of the frame for as long as the image object lives, and one more
#: frame-sized buffer while loading (measured: 17.3 bytes/pixel at load, 13.3 after).
_WEBP_RESIDENT_BYTES_PER_PIXEL = 12
_WEBP_LOAD_BYTES_PER_PIXEL = 4

#: libjpeg stores every DCT coefficient of the whole image (64 x 2 bytes per 8 x 8 block, at
#: full resolution even when drafting) for progressive, lossless and multi-scan files.
_JPEG_BLOCK_BYTES = 64 * 2
_JPEG_SOF_FULL_BUFFER = {0xC2, 0xC3, 0xC6, 0xC7, 0xCA, 0xCB, 0xCE, 0xCF}
_JPEG_SOF = {0xC0, 0xC1, 0xC5, 0xC9, 0xCD} | _JPEG_SOF_FULL_BUFFER
_JPEG_STANDALONE = {0x01, 0xD8} | set(range(0xD0, 0xD8))

_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLES_PER_PIXEL, _TIFF_ROWS_PER_STRIP = 258, 277, 278
_TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH = 322, 323
_TIFF_SIZE_TAGS = (_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLES_PER_PIXEL, _TIFF_ROWS_PER_STRIP,
                   _TIFF_TILE_WIDTH, _TIFF_TILE_LENGTH)
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunk headers walked looking for eXIf: encoders write 8-64 KiB IDATs, so a 20 MiB PNG has
#: a few thousand chunks at most; a file of more (tiny) chunks is scanned instead (~2 GB/s).
_PNG_CHUNK_WALK = 4096
#: Orientations 2-8 make exif_transpose allocate a transposed copy of the decoded image.
_TRANSPOSING_ORIENTATIONS = range(2, 9)


@contextmanager
def _pillow_input() -> Iterator[None]:
    """Turn what Pillow raises on corrupt input into ImageError; wrap only Pillow calls."""
    try:
        yield
    except UnidentifiedImageError as exc:
        raise ImageError(
            "not an image in an accepted format (JPEG, PNG, TIFF, BMP, WebP, GIF)") from exc
    except PILLOW_INPUT_ERRORS as exc:
        raise ImageError(f"image data is truncated or corrupt ({type(exc).__name__})") from exc


@dataclass(frozen=True)
class _Header:
    """What the header says decoding will produce and hold, read before any pixel decodes."""

    declared: tuple[int, int]     # width, height as stored
    decoded: tuple[int, int]      # after a JPEG draft
    mode: str                     # the mode load() produces
    load_extra: int               # decoder buffers alive only while loading
    resident_extra: int           # decoder buffers alive as long as the loaded image object
    transposes: bool              # EXIF orientation may make a rotated copy


@dataclass(frozen=True)
class _Plan:
    """The conversion steps decode_image will run, and the peak bytes of the whole decode."""

    header: _Header
    steps: tuple[str, ...]        # "rescale", "flatten" or "convert": each ends in a new image
    peak_bytes: int


def _storage(mode: str) -> int:
    return _STORAGE_BYTES.get(mode, _MAX_STORAGE_BYTES)


def _steps(mode: str, info: dict) -> tuple[str, ...]:
    """The conversions from ``mode`` to RGB; each step's output replaces the previous image."""
    if mode == "RGB":
        return ()
    if mode in _WIDE_MODES:
        return ("rescale", "convert")  # -> L (value range rescaled) -> RGB
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in info):
        return ("flatten",)
    return ("convert",)  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _step_output_bytes(step: str) -> int:
    return 1 if step == "rescale" else _storage("RGB")


def _peak_bytes(header: _Header, steps: tuple[str, ...], output_size: int | None) -> int:
    """Peak bytes of load, EXIF transpose, each conversion step and the resize.

    At each stage the image being read and the one being written are alive together; the
    file object (and a WebP decoder's buffers with it) is released by the first conversion.
    """
    width, height = header.decoded
    pixels = width * height
    current = pixels * _storage(header.mode)
    holder = header.resident_extra
    rows = _ROW_BYTES_PER_COLUMN * max(header.declared[0], width)
    stages = [current + holder + header.load_extra + rows]
    if header.transposes:
        stages.append(2 * current + holder)
    for step in steps:
        written = pixels * _step_output_bytes(step)
        stages.append(current + written + holder)
        current, holder = written, 0
    if output_size is not None:
        # Pillow resizes horizontally first into an output_size-wide, full-height RGB image;
        # the longer side covers an EXIF rotation having swapped the two.
        temporary = _storage("RGB") * output_size * max(width, height)
        stages.append(current + holder + temporary + _storage("RGB") * output_size ** 2)
    return max(stages) + _FIXED_BYTES


def _jpeg_buffers_whole_image(data: bytes) -> bool:
    """True if libjpeg will keep every coefficient of the image in memory.

    That is the case for progressive and lossless frames and for a first scan that does not
    interleave all components (libjpeg's ``has_multiple_scans``). Walks the marker segments
    up to the first SOS; anything unexpected counts as True, the costly answer.
    """
    position, components, full = 2, None, False
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return True
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _JPEG_STANDALONE:
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker in _JPEG_SOF and position + 9 < len(data):
            full = marker in _JPEG_SOF_FULL_BUFFER
            components = data[position + 9]
        elif marker == 0xDA:
            return full or components is None or position + 4 >= len(data) \
                or data[position + 4] < components
        position += 2 + length
    return True


def _jpeg_coefficient_bytes(declared: tuple[int, int], sampling: list[tuple[int, int]],
                            data: bytes) -> int:
    """libjpeg's whole-image coefficient buffers (0 if it streams): full-size even when drafting.

    ``sampling`` is each component's (h, v) factors from the SOF header (Pillow's ``layer``).
    """
    if not _jpeg_buffers_whole_image(data):
        return 0
    sampling = [(h, v) for h, v in sampling if h > 0 and v > 0] or [(1, 1)] * 4
    h_max = max(h for h, _ in sampling)
    v_max = max(v for _, v in sampling)
    mcu_columns = math.ceil(declared[0] / (8 * h_max))
    mcu_rows = math.ceil(declared[1] / (8 * v_max))
    return sum(mcu_columns * h * mcu_rows * v for h, v in sampling) * _JPEG_BLOCK_BYTES


def _positive_ints(value) -> list[int]:
    """A TIFF tag value as a list of positive ints ([] if absent or not integers)."""
    values = value if isinstance(value, tuple) else (value,)
    return [v for v in values if isinstance(v, int) and v > 0]


def _tiff_chunk_bytes(size: tuple[int, int], tags: dict[int, object]) -> int:
    """libtiff's buffer for one strip or tile of a compressed TIFF (Pillow reads raw ones
    itself, in small blocks).

    Charged at >= 4 bytes per pixel because Pillow reads YCbCr/JPEG TIFFs through libtiff's
    RGBA interface; a strip never has more rows than the image.
    """
    width, height = size
    bits = _positive_ints(tags.get(_TIFF_BITS_PER_SAMPLE)) or [8]
    samples = max((_positive_ints(tags.get(_TIFF_SAMPLES_PER_PIXEL)) or [1])[0], len(bits))
    total_bits = sum(bits) + (samples - len(bits)) * bits[-1]  # one value may stand for all
    bytes_per_pixel = max(math.ceil(total_bits / 8), 4)
    tile_width = _positive_ints(tags.get(_TIFF_TILE_WIDTH))
    tile_length = _positive_ints(tags.get(_TIFF_TILE_LENGTH))
    if tile_width and tile_length:
        return tile_width[0] * tile_length[0] * bytes_per_pixel
    rows = min((_positive_ints(tags.get(_TIFF_ROWS_PER_STRIP)) or [height])[0], height)
    return width * rows * bytes_per_pixel


def _png_has_exif(data: bytes) -> bool:
    """Whether a PNG has an eXIf chunk anywhere (it may follow the pixel data), from the
    chunk headers; past _PNG_CHUNK_WALK chunks, from a byte scan of the rest."""
    position = len(_PNG_SIGNATURE)
    for _ in range(_PNG_CHUNK_WALK):
        if position + 8 > len(data):
            return False
        kind = data[position + 4:position + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        position += 12 + int.from_bytes(data[position:position + 4], "big")  # length, type, data, CRC
    return b"eXIf" in data[position:]  # a false match only charges one copy too many


def _open(data: bytes, max_bytes: int, max_pixels: int,
          draft_size: int | None) -> tuple[Image.Image, _Header]:
    """Open ``data`` without decoding pixels, check the declared pixels, apply the draft and
    read what the plan needs from the header. Raises ImageError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, limit is {max_bytes}")
    data = bytes(data)
    # Only Pillow calls in here: what they raise on corrupt input becomes ImageError.
    with _pillow_input():
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image declares an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}")
        # Walk every frame header (a corrupt later TIFF page is refused like a corrupt first
        # one), then classify the first frame of an animated GIF/WebP or multi-page TIFF.
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        is_jpeg = isinstance(image, JpegImagePlugin.JpegImageFile)
        sampling = [(h, v) for _, h, v, _ in getattr(image, "layer", [])] if is_jpeg else []
        compressed_tiff = (isinstance(image, TiffImagePlugin.TiffImageFile)
                           and image.info.get("compression", "raw") != "raw")
        tiff_tags = {tag: image.tag_v2.get(tag) for tag in _TIFF_SIZE_TAGS} if compressed_tiff else {}
        if image.format == "PNG" and "exif" not in image.info:
            # An eXIf chunk after the pixel data is only read by load(): if there is one,
            # charge the rotated copy without knowing the orientation.
            orientation = 6 if _png_has_exif(data) else 1
        else:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if is_jpeg and draft_size:
            image.draft(image.mode, (draft_size, draft_size))
    pixels = width * height
    load_extra = resident_extra = 0
    if is_jpeg:
        load_extra = _jpeg_coefficient_bytes((width, height), sampling, data)
    elif compressed_tiff:
        load_extra = _tiff_chunk_bytes((width, height), tiff_tags)
    elif image.format == "WEBP":
        load_extra = _WEBP_LOAD_BYTES_PER_PIXEL * pixels
        resident_extra = _WEBP_RESIDENT_BYTES_PER_PIXEL * pixels
    header = _Header(declared=(width, height), decoded=image.size, mode=image.mode,
                     load_extra=load_extra, resident_extra=resident_extra,
                     transposes=orientation in _TRANSPOSING_ORIENTATIONS)
    return image, header


def _plan(image: Image.Image, header: _Header, output_size: int | None) -> _Plan:
    steps = _steps(header.mode, image.info)
    return _Plan(header, steps, _peak_bytes(header, steps, output_size))


def _mib(count: float, rounding) -> str:
    return f"{rounding(count * 10 / MIB) / 10:.1f}"


def _check_budget(plan: _Plan, max_decoded_bytes: int) -> None:
    if plan.peak_bytes > max_decoded_bytes:
        # Estimate rounded up, limit rounded down: the two printed figures never look equal.
        raise ImageError(f"image would decode to {_mib(plan.peak_bytes, math.ceil)} MiB, "
                         f"limit {_mib(max_decoded_bytes, math.floor)} MiB")


def _tiles(width: int, height: int) -> Iterator[tuple[int, int, int, int]]:
    for top in range(0, height, _TILE):
        for left in range(0, width, _TILE):
            yield left, top, min(left + _TILE, width), min(top + _TILE, height)


def _rescale_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit grey to 8-bit L by the type's range, tile by tile.

    Pillow's convert clips wide samples at 255; rescale by the range instead so a 16-bit
    grayscale PNG keeps its contrast. Per tile, so the float64 scratch stays small; the
    arithmetic is the same as on the whole array, so results are identical.
    """
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:  # I, F: by the image's own maximum (NaN propagates as in numpy's max)
        peak = np.max([np.asarray(image.crop(box)).max() for box in _tiles(*image.size)])
        top = max(float(peak), 1.0)
    gray = Image.new("L", image.size)
    for box in _tiles(*image.size):
        data = np.asarray(image.crop(box), dtype=np.float64)
        tile = np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        gray.paste(Image.fromarray(tile, mode="L"), box[:2])
    return gray


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite transparent pixels onto black (like a dermatoscope's vignette), tile by tile.

    The same alpha_composite as on the whole image, without two more full-size RGBA copies.
    """
    rgb = Image.new("RGB", image.size)
    for box in _tiles(*image.size):
        tile = image.crop(box).convert("RGBA")  # crop keeps a P image's palette and tRNS
        black = Image.new("RGBA", tile.size, (0, 0, 0, 255))
        rgb.paste(Image.alpha_composite(black, tile).convert("RGB"), box[:2])
    return rgb


_STEP_FUNCTIONS = {"rescale": _rescale_to_l, "flatten": _flatten_alpha,
                   "convert": lambda image: image.convert("RGB")}


def _decode(data: bytes, max_bytes: int, max_pixels: int, max_decoded_bytes: int,
            draft_size: int | None, output_size: int | None) -> Image.Image:
    image, header = _open(data, max_bytes, max_pixels, draft_size)
    plan = _plan(image, header, output_size)
    _check_budget(plan, max_decoded_bytes)
    with _pillow_input():
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when nothing to rotate
    # Plan the conversions for what was decoded: should a decoder settle its mode or
    # transparency only while loading, the steps still to come are checked against the budget.
    plan = _plan(image, replace(header, mode=image.mode), output_size)
    _check_budget(plan, max_decoded_bytes)
    for step in plan.steps:
        # Rebinding drops the previous image (and the file object's decoder buffers) before
        # the next step allocates: the peak is two images, as _peak_bytes charges.
        image = _STEP_FUNCTIONS[step](image)
    return image


def decoded_bytes_estimate(data: bytes, size: int | None = DEFAULT_INPUT_SIZE, *,
                           max_bytes: int = DEFAULT_MAX_BYTES,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Peak bytes ``preprocess_image(data, size)`` will allocate to decode ``data``.

    Reads the header only (no pixel is decoded; ~0.1 ms), so a service can reserve this much
    from a shared memory budget before decoding. Counts the decoded pixels in Pillow's
    storage after any JPEG draft, the decoder's own buffers, the EXIF-rotated copy, each
    conversion to 8-bit RGB and the resize to ``size`` (``size=None``: ``decode_image`` with
    no draft and no resize). Does not count the encoded bytes, which the caller already holds.

    Raises :class:`ImageError` for what decoding would refuse from the header: empty, over
    ``max_bytes`` or ``max_pixels``, unknown format, corrupt header.
    """
    draft_size = DRAFT_FACTOR * size if size else None
    image, header = _open(data, max_bytes, max_pixels, draft_size)
    return _plan(image, header, size).peak_bytes


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB Pillow image.

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding, as long
    as both sides stay >= ``draft_size``. ``max_decoded_bytes`` bounds the peak memory of the
    decode (see :func:`decoded_bytes_estimate` with ``size=None``), checked from the header.

    Raises :class:`ImageError` with a short reason for empty, oversize, unknown, corrupt or
    truncated input.
    """
    return _decode(data, max_bytes, max_pixels, max_decoded_bytes, draft_size, None)


def scale_pixels(rgb: np.ndarray) -> np.ndarray:
    """Map uint8 RGB to float32 in [-1, 1], as MobileNetV2 was trained: (x - 127.5) / 127.5."""
    return (rgb.astype(np.float32) - 127.5) / 127.5


def preprocess_image(
    data: bytes,
    size: int = DEFAULT_INPUT_SIZE,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> np.ndarray:
    """Turn encoded image bytes into the model input: float32 array of shape (size, size, 3).

    The whole frame is resized to a square (not cropped): HAM10000 frames are 4:3 with the
    lesion centred, and training saw the same squash. A JPEG much larger than ``size`` is
    decoded at a reduced scale first (``DRAFT_FACTOR``). Peak memory is at most
    ``max_decoded_bytes``, checked from the header before decoding.

    Raises :class:`ImageError` if the bytes are not an acceptable image.
    """
    image = _decode(data, max_bytes, max_pixels, max_decoded_bytes, DRAFT_FACTOR * size, size)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return scale_pixels(np.asarray(resized, dtype=np.uint8))
