"""Reading a user's training images the way the field's loaders show them.

``datasets``' Image feature and diffusers' ``load_image`` both turn a photo upright from its EXIF
orientation before use; the scan and ``diffmem train`` read image bytes themselves, so they do the
same here. Pillow's plain ``convert("RGB")`` also clips 16-bit greyscale (mode ``I;16``) at 255,
turning every such image nearly white (and so into near-duplicates of each other); these are scaled
from their full range instead.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# integer modes whose values span 0..65535 (16-bit PNG / TIFF greyscale) rather than 0..255
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


def open_image(data) -> Image.Image:
    """A path, bytes, ``datasets`` image dict or PIL image, upright and in RGB. Raises on unreadable input."""
    if isinstance(data, dict) and "bytes" in data:  # datasets' Image feature, undecoded
        data = data["bytes"] if data["bytes"] is not None else data.get("path")
    if isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    if isinstance(data, Path):
        data = str(data)
    if not isinstance(data, (str, Image.Image)) and not hasattr(data, "read"):  # else Pillow's "'int' object has no attribute 'read'"
        raise TypeError(f"an image is read from a file path, encoded bytes, a datasets Image dict or a PIL image, "
                        f"not {type(data).__name__}")
    im = data if isinstance(data, Image.Image) else Image.open(data)
    im.load()
    if im.getexif().get(_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in _WIDE_MODES or im.mode == "F":
        wide = np.asarray(im, dtype=np.float64)
        grey = wide / 65535.0 if im.mode != "F" else _unit_float(wide)
        return Image.fromarray(np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def empty_cell(value) -> bool:
    """A table cell that holds nothing: None, or NaN as pandas holds one."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def image_cell(value, folder: str | Path | None = None, working_directory: bool = True):
    """A table's image cell as :func:`open_image` takes it, or None when the cell is empty (None, NaN,
    a blank string, or ``datasets``' Image struct with neither bytes nor path).

    A relative file path, plain or in that struct, is looked for in ``folder`` (the table's own, as an
    image folder's metadata names its files) and else in the working directory, where ``datasets``
    looks: ``Dataset.to_parquet`` writes an image it loaded from ``imgs/0.png`` as
    ``{"bytes": None, "path": "imgs/0.png"}``, relative to wherever the dataset was built. A path in
    neither place raises FileNotFoundError naming both. ``working_directory=False`` looks in ``folder``
    alone: an image folder's metadata names only its own files, and a missing one must not be taken
    from wherever the command runs."""
    if empty_cell(value):
        return None
    if isinstance(value, dict) and "bytes" in value and value["bytes"] is None:
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, str) and not value.strip():  # as a CSV or JSON file leaves an empty cell
        return None
    if not isinstance(value, (str, Path)) or Path(value).is_absolute() or folder is None:
        return value
    in_folder = Path(folder) / value
    if in_folder.exists() or not working_directory:
        return in_folder
    if Path(value).exists():
        return Path(value)
    raise FileNotFoundError(f"{value} is in neither the table's folder {Path(folder).resolve()} "
                            f"nor the working directory {Path.cwd()}")


def centre_square(im: Image.Image, size: int) -> Image.Image:
    """``im`` cropped to its centre square and resized bicubic to ``size`` x ``size``, as diffusers'
    training scripts show images to a model (Resize + CenterCrop) and ``diffmem train`` does."""
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im if s == size else im.resize((size, size), Image.BICUBIC)


def _unit_float(arr: np.ndarray) -> np.ndarray:
    """A float image in [0, 1], or in 0..255 when its values run past 1."""
    if not np.isfinite(arr).all():
        raise ValueError("the image holds NaN or inf values")
    return arr / 255.0 if arr.max(initial=0) > 1.0 else arr


def image_array(data) -> np.ndarray:
    """As :func:`open_image`, or an array, as float32 (H, W, 3) in [0, 1].

    Integer arrays are read by their dtype (uint8 over 255, uint16 over 65535; wider integers over 255
    unless their values run past it), so a dark uint8 image stays dark; float arrays are taken as
    [0, 1] unless their values run past 1 (then 0..255).
    Greyscale (H, W) or (H, W, 1) arrays are repeated to three channels; an alpha channel is dropped.
    """
    if not isinstance(data, np.ndarray):
        return np.asarray(open_image(data), dtype=np.float32) / 255.0
    arr = data
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {data.shape}")
    arr = arr[..., :3] if arr.shape[-1] == 4 else np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / integer_full_scale(arr)
    return _unit_float(arr.astype(np.float32))


def integer_full_scale(arr: np.ndarray) -> float:
    """The value of white in an integer image array (or batch): 65535 for uint16 and for wider integers
    whose values run past 255, else 255."""
    wide = arr.dtype == np.uint16 or (arr.dtype.itemsize > 2 and arr.max(initial=0) > 255)
    return 65535.0 if wide else 255.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] as uint8 (what a PNG of them holds); uint8 passes through. A quarter of
    float32's memory, for generations kept only to be shown."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
