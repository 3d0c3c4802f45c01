"""The one image preprocessing function, shared by training, evaluation and the enclave.

Training (models/train.py), evaluation (models/evaluate.py) and inference in the enclave all
call :func:`preprocess_image`, so what the model sees cannot drift between them.

Steps: check the byte size, identify the format without decoding, check the declared pixel
count (a decompression bomb declares a huge size in a tiny file), decode the first frame,
apply the EXIF orientation, convert any mode (RGBA, LA, P, L, I;16, CMYK, ...) to 8-bit RGB,
resize to the model's square input with an antialiasing filter and scale to [-1, 1] as
MobileNetV2 expects.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nitrolesion.errors import ImageError

#: Formats we decode. Fewer decoders means less attack surface; these cover what cameras,
#: dermatoscopes and phones produce.
ACCEPTED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")

#: Largest encoded image accepted. A 24 MP JPEG from a dermatoscope is 5-12 MB; 20 MiB
#: leaves room for PNG/TIFF without letting one request pin much enclave memory.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

#: Largest decoded image accepted, in pixels. 40 MP covers every current camera sensor;
#: decoding costs width*height*4 bytes (160 MB at this limit), so a 50 MP "bomb" is refused
#: from its header before any pixel is decoded.
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow's own bomb guard is global and raises before we can say what was declared; our
# per-call limit below is stricter and checked from the header, before any pixel decodes.
Image.MAX_IMAGE_PIXELS = None

#: Input side of the shipped model; the model file is authoritative (see classifier).
DEFAULT_INPUT_SIZE = 192


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping 16-bit data."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's convert("RGB") clips 16/32-bit samples at 255; rescale by the type's
        # range instead so a 16-bit grayscale PNG keeps its contrast.
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(data.max()), 1.0)
        gray = np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels carry no lesion; put them on black like a dermatoscope's vignette.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB Pillow image.

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding, as long
    as both sides stay >= ``draft_size``; it only saves time on large photos.

    Raises :class:`ImageError` with a short reason for empty, oversize, unknown, corrupt or
    truncated input.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"expected image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty image")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, limit is {max_bytes}")
    try:
        image = Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image declares an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, limit is {max_pixels}"
            )
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animated GIF/WebP/multi-page TIFF: classify the first frame
        if draft_size and image.format == "JPEG" and image.mode in ("RGB", "L"):
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image in an accepted format (JPEG, PNG, TIFF, BMP, WebP, GIF)") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError,
            TypeError, IndexError, struct.error) as exc:
        # Truncated or corrupt data surfaces as OSError/SyntaxError/ValueError in Pillow, and
        # past Image.open (which itself catches the last three) as TypeError/IndexError/
        # struct.error too: a TIFF whose next-page pointer leads to a page without
        # dimensions raises TypeError from n_frames.
        raise ImageError(f"image data is truncated or corrupt ({type(exc).__name__})") from exc


def scale_pixels(rgb: np.ndarray) -> np.ndarray:
    """Map uint8 RGB to float32 in [-1, 1], as MobileNetV2 was trained: (x - 127.5) / 127.5."""
    return (rgb.astype(np.float32) - 127.5) / 127.5


def preprocess_image(
    data: bytes,
    size: int = DEFAULT_INPUT_SIZE,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Turn encoded image bytes into the model input: float32 array of shape (size, size, 3).

    The whole frame is resized to a square (not cropped): HAM10000 frames are 4:3 with the
    lesion centred, and training saw the same squash.

    Raises :class:`ImageError` if the bytes are not an acceptable image.
    """
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, draft_size=2 * size)
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return scale_pixels(np.asarray(resized, dtype=np.uint8))
