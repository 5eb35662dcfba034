"""
Image decoding for training: any file PIL can open -> an upright 8-bit RGB image, or a `BadSample` saying why not.

What `load_image` does, in order (see shared/specs/vae_and_data.md §3.10 for what SimpleTuner does with bad inputs):
  1. `Image.open` + `img.load()`: the full decode, so a truncated or corrupt file fails here, at discovery, and not
     in the middle of a training step. `ImageFile.LOAD_TRUNCATED_IMAGES` is left False on purpose (it would paper
     over half-written files with grey).
  2. EXIF orientation (`ImageOps.exif_transpose`): phone photos are stored sideways with a rotate tag.
  3. Mode -> RGB:
       - 1 / L / P / CMYK / YCbCr / RGBX: PIL's own conversion (CMYK is converted without an ICC profile);
       - P with a transparency entry, PA, LA, La, RGBA, RGBa: alpha is composited OVER WHITE, then dropped. White,
         not black, because transparent PNGs (logos, cut-outs, stickers) are designed to be viewed on a light page,
         and PIL's plain `convert("RGB")` would expose whatever colour the invisible pixels happen to hold;
       - I;16 (16-bit grayscale PNG/TIFF): value / 257, rounded, so 65535 -> 255 and 0 -> 0 (PIL's own
         conversion clips at 255 instead, turning most 16-bit images white);
       - I (32-bit int): treated as 16-bit when every value is in 0..65535 (the common case: 16-bit PNGs on some
         PIL versions), else min-max stretched to 0..255;
       - F (32-bit float): x255 when the values lie in [0, 1], else min-max stretched.
`to_tensor` then gives the [-1, 1] float tensor of the official LongCat preprocessing (ToTensor + Normalize(0.5, 0.5),
shared/specs/longcat_image.md §8.1).
"""
import numpy as np
import torch
from PIL import Image, ImageOps

# Formats PIL registers but cannot decode without an external handler or program (stub plugins, ghostscript).
_UNDECODABLE = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS"}
IMAGE_EXTENSIONS = frozenset(
    ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN and fmt not in _UNDECODABLE
)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ORIENTATION_TAG = 0x0112


class BadSample(Exception):
    """A file that cannot be used for training. `reason` is a short code for reports; `detail` says what failed."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    """16/32-bit integer and float grayscale -> uint8 (rules in the module docstring)."""
    arr = np.asarray(img)
    if img.mode in _16BIT_MODES:
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if img.mode == "I":
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        return _stretch(arr)
    arr = np.nan_to_num(arr.astype(np.float64))  # "F"
    if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return np.round(arr * 255.0).astype(np.uint8)
    return _stretch(arr)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha over white, high bit depths scaled (see the module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in _16BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(img)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path) -> Image.Image:
    """Decode `path` fully, apply EXIF orientation, return 8-bit RGB. Raises BadSample("unreadable", why)."""
    try:
        with Image.open(path) as img:
            img.load()  # full decode: truncation and corrupt data surface here
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("unreadable", f"over PIL's decompression-bomb limit ({e})") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise BadSample("unreadable", f"{type(e).__name__}: {e}") from None


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1..8 from what the header already holds (a PNG is never decoded for this)."""
    try:
        if img.format == "PNG":  # PngImageFile.getexif() decodes the whole file when the tag is absent
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        return int(exif.get(_ORIENTATION_TAG, 1) or 1)
    except Exception:
        return 1  # a broken EXIF block is not a reason to drop the image; exif_transpose ignores it too


def image_size(path) -> tuple:
    """(W, H) as `load_image` will return it, from the header only (lazy open): W/H swapped for orientations 5-8."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)
    except Exception as e:
        raise BadSample("unreadable", f"{type(e).__name__}: {e}") from None


def probe_image(path) -> tuple:
    """(W, H) after a full `load_image`: slower than `image_size`, but proves the file decodes."""
    return load_image(path).size


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [-1, 1], the same arithmetic as ToTensor + Normalize(0.5, 0.5)."""
    arr = np.array(to_rgb(img), dtype=np.uint8)  # [H, W, 3], a writable copy
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255.0)
    return x.sub(0.5).div(0.5)
