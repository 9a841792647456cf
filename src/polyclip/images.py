"""Image decoding: any file, bytes, stream or PIL image -> an 8-bit RGB PIL image.

Conventions follow the references that the released checkpoints were trained and evaluated with:

- Transparency is dropped, as OpenAI CLIP (`clip/clip.py`, `_convert_image_to_rgb`) and open_clip
  (`open_clip/transform.py`, `MaybeConvertMode`) do with `Image.convert("RGB")`: the colour channels are
  kept and alpha is ignored. transformers >= 5 instead composites transparent images over white
  (`image_transforms.convert_to_rgb`); pass ``background=(255, 255, 255)`` to get that behaviour.
- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo stored sideways with an
  orientation tag is seen upright. None of the references do this for files; it only changes images
  that carry an orientation tag other than 1.
- High bit depth greyscale (16-bit ``I;16*``, 32-bit ``I``, float ``F``) is scaled into 0..255 instead of
  clipped: Pillow's own ``convert("RGB")`` clips every value above 255, which turns most 16-bit images
  white.
- Decompression bombs are refused before any pixel is decoded: the header's width x height is compared
  with ``max_pixels`` (default: Pillow's 89,478,485), per call. Pillow's process-wide
  ``Image.MAX_IMAGE_PIXELS`` is never modified (another thread relies on it while this one decodes): the
  header is opened through Pillow's own plugin registry without ``Image.open``'s global check, and the
  call's own limit is applied instead. Plugins that check sizes again while decoding (GIF frames, ICO and
  ICNS sub-images) still apply Pillow's global; such a refusal is reported as "too large" too.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageSource",
    "is_image_file",
    "load_image",
    "to_rgb",
]

# Pillow's own default limit (1024 * 1024 * 1024 // 4 // 3): about a 9,459 x 9,459 image.
DEFAULT_MAX_PIXELS = 89_478_485

# Extensions Pillow decodes out of the box (without extra plugins), lower case with the dot.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
        ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".jpx", ".pcx",
        ".sgi", ".rgb", ".dds", ".icns", ".avif",
    }
)  # fmt: skip

EXIF_ORIENTATION_TAG = 0x0112

ImageSource = str | Path | bytes | bytearray | memoryview | BinaryIO | Image.Image


class ImageDecodeError(ValueError):
    """An image could not be read: missing, empty, corrupt, truncated, too large or of an unknown format."""


def is_image_file(path: str | Path) -> bool:
    """True when the file name ends with an extension Pillow decodes (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] | None = None,
    bit_depth_scaling: str = "full_range",
    exif_orientation: bool = True,
    convert_rgb: bool = True,
) -> Image.Image:
    """Decode ``source`` into an 8-bit RGB PIL image.

    Args:
        source: a file path, encoded bytes, a binary file object, or an already decoded PIL image.
        max_pixels: refuse images whose width x height exceeds this (decompression bombs); ``None`` disables
            the check. Applies to encoded input only: a PIL image is already in memory.
        background: ``None`` drops transparency (OpenAI CLIP / open_clip); an RGB colour composites
            transparent pixels over it ((255, 255, 255) is what transformers >= 5 does).
        bit_depth_scaling: how greyscale images deeper than 8 bits become 8-bit. ``"full_range"`` maps the
            type's nominal range to 0..255 (65535 -> 255 for 16-bit); ``"min_max"`` stretches each image's own
            min..max to 0..255 (useful for 12-bit medical scans stored in 16-bit containers). 32-bit integer
            images outside 0..65535 and float images outside 0..1 always use min-max.
        exif_orientation: apply the EXIF orientation tag so the image is seen upright.
        convert_rgb: ``False`` keeps the decoded 8-bit mode ("L", "LA", "P", "RGBA", "CMYK"...; deeper
            greyscale still becomes "L"), for pipelines that resize before converting to RGB, as
            torchvision-based references do (see `polyclip.transforms`).

    Raises:
        ImageDecodeError: the source cannot be decoded; the message names the file and the cause.
    """
    if bit_depth_scaling not in ("full_range", "min_max"):
        raise ImageDecodeError(
            f"bit_depth_scaling must be 'full_range' or 'min_max', got {bit_depth_scaling!r}"
        )
    if max_pixels is not None and max_pixels <= 0:
        raise ImageDecodeError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
    if isinstance(source, Image.Image):
        return to_rgb(
            source,
            background=background,
            bit_depth_scaling=bit_depth_scaling,
            exif_orientation=exif_orientation,
            name="<PIL image>",
            convert_rgb=convert_rgb,
        )

    name, stream = _open_source(source)
    try:
        try:
            image = _open_header(stream, name)
        except Image.UnidentifiedImageError as error:
            raise ImageDecodeError(
                f"cannot decode {name}: not an image in a format Pillow can read ({error})"
            ) from error
        with image:
            _check_pixel_count(image, name, max_pixels)
            try:
                image.load()
            except MemoryError:
                raise
            except Image.DecompressionBombError as error:
                raise ImageDecodeError(
                    f"cannot decode {name}: the image is too large for Pillow's process-wide limit "
                    f"(Image.MAX_IMAGE_PIXELS): {error}"
                ) from error
            except Exception as error:  # decoders raise OSError, SyntaxError, EOFError, zlib errors...
                raise ImageDecodeError(
                    f"cannot decode {name}: the file is corrupt or truncated ({type(error).__name__}: {error})"
                ) from error
            return to_rgb(
                image,
                background=background,
                bit_depth_scaling=bit_depth_scaling,
                exif_orientation=exif_orientation,
                name=name,
                convert_rgb=convert_rgb,
            )
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as error:
        raise ImageDecodeError(f"cannot decode {name}: {type(error).__name__}: {error}") from error
    finally:
        stream.close()  # always this module's own stream, never the caller's


def _open_header(stream: BinaryIO, name: str) -> Image.Image:
    """``Image.open`` without its decompression-bomb check: the same plugins tried in the same order
    (``Image.ID``, ``Image.OPEN``; the common ones first, then all), reading only the header.

    ``Image.open`` compares the size with the process-wide ``Image.MAX_IMAGE_PIXELS``; the caller checks
    the size with its own limit instead, so that the global is neither relied on nor changed.
    """
    prefix = stream.read(16)
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):
        loader()
        for format_id in list(Image.ID):
            if format_id in tried or format_id.upper() not in Image.OPEN:
                continue
            tried.add(format_id)
            factory, accept = Image.OPEN[format_id.upper()]
            result = accept(prefix) if accept else True
            if not result or isinstance(result, str):  # a string: "looks like this format but unsupported"
                continue
            stream.seek(0)
            try:
                return factory(stream, name)
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format after all, as Image.open treats it
    raise Image.UnidentifiedImageError(f"cannot identify image file {name!r}")


def to_rgb(
    image: Image.Image,
    *,
    background: tuple[int, int, int] | None = None,
    bit_depth_scaling: str = "full_range",
    exif_orientation: bool = True,
    name: str = "<image>",
    convert_rgb: bool = True,
) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see the module docstring for the rules).

    An RGB image without an orientation tag is returned as it is (no copy). ``convert_rgb=False`` stops
    after the orientation and the bit-depth steps: the image keeps its 8-bit mode.
    """
    if exif_orientation and _orientation(image) not in (1, None):
        image = ImageOps.exif_transpose(image)

    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode.startswith("I") or mode == "F":
            grey = Image.fromarray(_deep_to_uint8(np.asarray(image), mode, bit_depth_scaling), "L")
            return grey.convert("RGB") if convert_rgb else grey
        if not convert_rgb:
            return image
        if background is not None and _has_transparency(image):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")
    except MemoryError:
        raise
    except Exception as error:
        raise ImageDecodeError(
            f"cannot convert {name} from mode {mode!r} to RGB ({type(error).__name__}: {error})"
        ) from error


def _open_source(source: ImageSource) -> tuple[str, BinaryIO]:
    """(name for messages, a binary stream positioned at the start of the encoded image)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise ImageDecodeError("cannot decode <bytes>: the data is empty (0 bytes)")
        return "<bytes>", io.BytesIO(data)
    if isinstance(source, str | Path):
        text = str(source)
        if text.startswith(("http://", "https://")):
            raise ImageDecodeError(
                f"cannot decode {text}: URLs are not downloaded here; fetch the file first and pass its path"
            )
        path = Path(source)
        if not path.exists():
            raise ImageDecodeError(f"cannot decode {path}: the file does not exist")
        if not path.is_file():
            raise ImageDecodeError(f"cannot decode {path}: not a regular file")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"cannot decode {path}: the file is empty (0 bytes)")
        try:
            return str(path), path.open("rb")
        except OSError as error:
            raise ImageDecodeError(f"cannot decode {path}: cannot open the file ({error})") from error
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        data = source.read()
        if not isinstance(data, bytes | bytearray):
            raise ImageDecodeError(f"cannot decode {name}: the stream is not opened in binary mode")
        if not data:
            raise ImageDecodeError(f"cannot decode {name}: the stream is empty (0 bytes)")
        return name, io.BytesIO(data)
    raise ImageDecodeError(
        f"cannot read an image from an object of type {type(source).__name__}; pass a path, encoded bytes, "
        "a binary file object or a PIL image"
    )


def _check_pixel_count(image: Image.Image, name: str, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError(
            f"cannot decode {name}: the image is too large ({width} x {height} = {width * height:,} pixels, "
            f"limit {max_pixels:,}); this guards against decompression bombs. If the file is trusted, "
            "raise the limit with load_image(..., max_pixels=N) or disable it with max_pixels=None"
        )


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag (1-8), or None where there is none or the EXIF block is unreadable."""
    try:
        return image.getexif().get(EXIF_ORIENTATION_TAG)
    except Exception:  # a damaged EXIF block must not make an otherwise good image unreadable
        return None


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info


def _deep_to_uint8(pixels: np.ndarray, mode: str, bit_depth_scaling: str) -> np.ndarray:
    """(H, W) greyscale of more than 8 bits -> (H, W) uint8, scaling the range instead of clipping it."""
    pixels = pixels.astype(np.float64)
    if mode.startswith("I;16"):
        nominal_max: float | None = 65535.0
    elif mode == "I":
        # Older Pillow versions and some TIFF writers hand 16-bit data over as 32-bit "I".
        in_16_bit_range = pixels.size > 0 and pixels.min() >= 0 and pixels.max() <= 65535
        nominal_max = 65535.0 if in_16_bit_range else None
    else:  # "F": float images are taken to be in 0..1 when they are
        in_unit_range = pixels.size > 0 and pixels.min() >= 0 and pixels.max() <= 1
        nominal_max = 1.0 if in_unit_range else None

    if bit_depth_scaling == "full_range" and nominal_max is not None:
        scaled = pixels * (255.0 / nominal_max)
    else:
        finite = pixels[np.isfinite(pixels)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        span = high - low
        scaled = (pixels - low) * (255.0 / span) if span > 0 else np.zeros_like(pixels)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
