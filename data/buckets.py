"""
Aspect-ratio buckets: SimpleTuner's algorithm (shared/specs/vae_and_data.md §3.4), decided once per sample.

Notation: A = `aspect_bucket_alignment` (default 64), round_A(v) = max(A, round(v / A) * A) with Python's `round`
(banker's rounding: 480/64 = 7.5 -> 512, 416/64 = 6.5 -> 384, as SimpleTuner does; kept for compatibility, so a
SimpleTuner user gets the same buckets). The aspect key is round(W / H, 2).

Target (bucket) size for an aspect a:
  - `pixel` (R = short edge in px): a < 1 -> (R, int(R / a)); else (int(R * a), R); both sides round_A.
  - `area` (R in megapixels): E = round_A(int(sqrt(area))) where the area is R * 1e6, snapped to 512² / 768² /
    1024² / 1536² / 2048² when R is within 0.05 of 0.25 / 0.5 / 1 / 2 / 4 MP; then (round_A(E * sqrt(a)),
    round_A(E / sqrt(a))), or E x E for a = 1.
  - `pixel_area` (R = edge in px): converted to `area` with R² / 1e6 MP; the size limits (minimum_image_size,
    maximum_image_size, target_downsample_size) are converted the same way when they are > 10.
  The first target computed for an aspect key is memoised per dataset, so every sample of a bucket key has the same
  shape. Sizes are processed in sorted path order, so the memo (and everything else) is deterministic.

Resize, then crop:
  - `crop: false` (default): resize to the intermediary size, which keeps the original aspect and covers the target
    (SimpleTuner's formula: the target's smaller side is matched, the other is int(side * aspect); if that falls
    short of the target it is grown to the cover size, rounding up), then crop to the target with `crop_style`.
  - `crop: true`: the target comes from `crop_aspect` (square, preserve, closest or random of
    `crop_aspect_buckets`), and the window is cut from the ORIGINAL image without resizing; only if the image is
    smaller than the target is it upscaled to cover it, and only if it is larger than `maximum_image_size` is it
    first downsampled (keeping its aspect) to cover the `target_downsample_size` target.
  Crop styles: center ((Wi - W)//2, (Hi - H)//2), corner (top-left), random (uniform integers from a generator
  seeded by (seed, dataset id, relative path), so the crop is the same on every run and cached latents stay valid).
The resize filter is BICUBIC, as the official LongCat-Image trainer (SimpleTuner uses LANCZOS).

Differences from SimpleTuner: square images get E x E (or the round_A'ed R) like every other aspect (SimpleTuner sets
an unaligned R x R for squares in `pixel` mode); `crop: true` + `square` never squashes a non-square image; the
intermediary is always computed after the memo lookup, so it always covers the final target. LongCat needs every
bucket side to be a multiple of 16 (VAE /8, then 2x2 patches): alignments 8 and 24 are rejected.
"""
import math
import random
from dataclasses import dataclass
from typing import Optional

from PIL import Image

ALIGNMENTS = (8, 16, 24, 32, 64)  # SimpleTuner's --aspect_bucket_alignment choices
LATENT_MULTIPLE = 16  # LongCat: 8x VAE downsampling, then 2x2 patchify
ASPECT_DIGITS = 2  # --aspect_bucket_rounding default
AREA_SNAP = {0.25: 512, 0.5: 768, 1.0: 1024, 2.0: 1536, 4.0: 2048}  # megapixels -> square edge
MAX_BUCKET_ASPECT = 8.0  # buckets beyond 8:1 (or 1:8) are excluded unless maximum/minimum_aspect_ratio say otherwise
MAX_BUCKET_PIXELS = 4096 * 4096  # no bucket (or upscaled intermediary) above this, whatever the settings


@dataclass(frozen=True)
class Geometry:
    """How one source image becomes a training image: resize to `resize`, then cut `crop` (l, t, r, b) = `bucket`."""
    bucket: tuple  # (W, H) of the training image; every side a multiple of the alignment and of 16
    resize: tuple  # (W, H) the source image is resized to first (equal to its own size: no resize)
    crop: tuple  # (left, top, right, bottom) inside `resize`; right - left == W, bottom - top == H


def check_alignment(alignment: int) -> int:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"aspect_bucket_alignment must be one of {ALIGNMENTS}, got {alignment}")
    if alignment % LATENT_MULTIPLE:
        raise ValueError(f"aspect_bucket_alignment {alignment} gives bucket sides that are not multiples of 16, which "
                         "LongCat needs (VAE /8 then 2x2 patches); use 16, 32 or 64 (64 is the LongCat default)")
    return alignment


def round_to_grid(value: float, alignment: int) -> int:
    """round_A: nearest multiple of `alignment` (banker's rounding at .5), at least `alignment`."""
    return max(alignment, int(round(value / alignment) * alignment))


def aspect_key(size) -> float:
    """The bucket key: W / H rounded to 2 decimals."""
    return round(size[0] / size[1], ASPECT_DIGITS)


def as_area_units(value: Optional[float], resolution_type: str) -> Optional[float]:
    """A size in the dataset's unit -> the unit the bucketing uses (pixel_area edges in px -> megapixels)."""
    if value is None or resolution_type != "pixel_area" or value <= 10:
        return value
    return value * value / 1e6


def square_edge(megapixels: float, alignment: int) -> int:
    """E: the aligned square edge of a target area, with SimpleTuner's snap of common megapixel values."""
    area = megapixels * 1e6
    for mp, edge in AREA_SNAP.items():
        if abs(megapixels - mp) < 0.05:
            area = edge * edge
            break
    return round_to_grid(int(math.sqrt(area)), alignment)


def target_size(aspect: float, resolution: float, resolution_type: str, alignment: int) -> tuple:
    """Bucket (W, H) for a rounded aspect. `pixel`: R is the short edge in px; `area`: R in megapixels."""
    aspect = max(aspect, 10 ** -ASPECT_DIGITS)  # taller than 200:1 rounds to 0; too_large then excludes it
    if resolution_type == "pixel":
        if aspect < 1:
            w, h = resolution, int(resolution / aspect)
        else:
            w, h = int(resolution * aspect), resolution
        return round_to_grid(w, alignment), round_to_grid(h, alignment)
    edge = square_edge(resolution, alignment)
    if aspect == 1.0:
        return edge, edge
    s = math.sqrt(aspect)
    return round_to_grid(edge * s, alignment), round_to_grid(edge / s, alignment)


def cover_size(size: tuple, target: tuple) -> tuple:
    """Intermediary size: keeps the aspect of `size` and is at least `target` on both sides."""
    (w0, h0), (wt, ht) = size, target
    a0 = w0 / h0
    if wt < ht:
        wi, hi = wt, int(wt / a0)
    else:
        wi, hi = int(ht * a0), ht
    if wi < wt or hi < ht:  # grow in proportion until both sides cover the target
        s = max(wt / w0, ht / h0)
        wi, hi = math.ceil(w0 * s - 1e-6), math.ceil(h0 * s - 1e-6)
    return max(wi, wt), max(hi, ht)


def crop_box(size: tuple, target: tuple, style: str, rng: random.Random) -> tuple:
    """(left, top, right, bottom) of a `target` window inside an image of `size`."""
    dx, dy = size[0] - target[0], size[1] - target[1]
    assert dx >= 0 and dy >= 0, f"crop {target} does not fit in {size}"
    if style == "center":
        left, top = dx // 2, dy // 2
    elif style == "corner":
        left, top = 0, 0
    else:
        left, top = rng.randint(0, dx), rng.randint(0, dy)
    return left, top, left + target[0], top + target[1]


class BucketPlanner:
    """Geometry for every sample of ONE dataset (the target memo lives here). Feed samples in sorted order."""

    def __init__(self, spec, *, seed: int = 0, alignment: int = 64):
        self.spec, self.seed, self.alignment = spec, seed, check_alignment(alignment)
        self.area_mode = spec.resolution_type != "pixel"
        r = spec.resolution
        self.resolution = r * r / 1e6 if spec.resolution_type == "pixel_area" else r  # px edge, or megapixels
        self.memo = {}  # aspect key -> (W, H): the first target of each key wins

    def _units(self, value):
        return as_area_units(value, self.spec.resolution_type)

    def too_small(self, size: tuple) -> Optional[str]:
        """Exclusion reason when the original is under `minimum_image_size` (both edges for pixel, area otherwise)."""
        m, (w, h) = self._units(self.spec.minimum_image_size), size
        if not m:
            return None
        if not self.area_mode and min(w, h) < m:
            return f"too_small: {w}x{h} has an edge under minimum_image_size {m:g} px"
        if self.area_mode and w * h < m * 1e6:
            return f"too_small: {w}x{h} is {w * h / 1e6:.3f} MP, under minimum_image_size {m:g} MP"
        return None

    def aspect_out_of_range(self, geom: Geometry) -> Optional[str]:
        """Exclusion reason when the bucket aspect is outside minimum/maximum_aspect_ratio (SimpleTuner's rule)."""
        a, lo, hi = aspect_key(geom.bucket), self.spec.minimum_aspect_ratio, self.spec.maximum_aspect_ratio
        if (lo and a < lo) or (hi and a > hi):
            return f"aspect_out_of_range: bucket aspect {a} is outside [{lo or 0:g}, {hi or 'inf'}]"
        return None

    def too_large(self, size: tuple, geom: Geometry) -> Optional[str]:
        """Exclusion reason when the bucket is beyond MAX_BUCKET_ASPECT (unless minimum/maximum_aspect_ratio allow
        it) or MAX_BUCKET_PIXELS, or the image would be upscaled past MAX_BUCKET_PIXELS (extreme aspects in `pixel`
        mode, where R is the short edge: a 20000x20 image at 1024 would be a 1024000x1024 bucket)."""
        (w, h), (rw, rh) = geom.bucket, geom.resize
        top, bottom = self.spec.maximum_aspect_ratio or MAX_BUCKET_ASPECT, self.spec.minimum_aspect_ratio or 0
        bottom = bottom or 1 / MAX_BUCKET_ASPECT
        why = f"bucket_too_large: {size[0]}x{size[1]} would train as a {w}x{h} bucket"
        if w / h > top or w / h < bottom:
            return f"{why}, aspect {w / h:.3g} beyond [{bottom:.3g}, {top:g}] (set minimum/maximum_aspect_ratio)"
        if w * h > MAX_BUCKET_PIXELS or rw * rh > max(MAX_BUCKET_PIXELS, size[0] * size[1]):
            return f"{why} resized from {rw}x{rh}, over the {MAX_BUCKET_PIXELS / 1e6:.1f} MP limit"
        return None

    def _too_large(self, size: tuple) -> bool:
        m, (w, h) = self._units(self.spec.maximum_image_size), size
        return w * h > m * 1e6 if self.area_mode else max(w, h) > m

    def _crop_aspect(self, size: tuple, rng: random.Random) -> float:
        mode, buckets = self.spec.crop_aspect, self.spec.crop_aspect_buckets
        if mode == "square":
            return 1.0
        if mode == "preserve":
            return aspect_key(size)
        if mode == "closest":
            return min(buckets, key=lambda b: abs(b["aspect"] - aspect_key(size)))["aspect"]
        return rng.choices([b["aspect"] for b in buckets], weights=[b["weight"] for b in buckets])[0]

    def plan(self, size: tuple, rel: str) -> Geometry:
        """Geometry of a sample of original `size` (W, H, EXIF-upright) at relative path `rel`."""
        rng = random.Random(f"{self.seed}:{self.spec.id}:{rel}")  # str seeds hash with sha512: stable across runs
        rtype = "area" if self.area_mode else "pixel"
        aspect = self._crop_aspect(size, rng) if self.spec.crop else aspect_key(size)
        target = target_size(aspect, self.resolution, rtype, self.alignment)
        target = self.memo.setdefault(aspect_key(target), target)
        if not self.spec.crop:
            resize = cover_size(size, target)
        else:
            resize = size
            if self.spec.maximum_image_size and self._too_large(size):
                small = target_size(aspect_key(size), self._units(self.spec.target_downsample_size), rtype,
                                    self.alignment)
                resize = cover_size(size, small)
            if resize[0] < target[0] or resize[1] < target[1]:
                resize = cover_size(size, target)  # smaller than the bucket: upscale to cover it
        box = crop_box(resize, target, self.spec.crop_style, rng)
        if target[0] % LATENT_MULTIPLE or target[1] % LATENT_MULTIPLE:
            raise ValueError(f"bucket {target[0]}x{target[1]} is not a multiple of {LATENT_MULTIPLE}")
        return Geometry(bucket=tuple(target), resize=tuple(resize), crop=box)


def apply_geometry(img: Image.Image, geom: Geometry) -> Image.Image:
    """Resize (BICUBIC, as the official LongCat trainer) to `geom.resize`, then crop to `geom.crop`."""
    if img.size != tuple(geom.resize):
        img = img.resize(tuple(geom.resize), Image.Resampling.BICUBIC)
    if tuple(geom.crop) != (0, 0, *geom.resize):
        img = img.crop(tuple(geom.crop))
    return img


def bucket_label(bucket) -> str:
    """A bucket key as text: (W, H) -> "WxH" for images, (W, H, F) -> "WxH@F" for video clips of F frames."""
    return f"{bucket[0]}x{bucket[1]}" + (f"@{bucket[2]}" if len(bucket) > 2 else "")


def format_bucket_table(buckets) -> str:
    """{dataset id: {(W, H) or (W, H, F): samples or count}} -> an aligned text table for the start-up print."""
    rows = [("dataset", "bucket", "aspect", "samples")]
    for ds, per_bucket in buckets.items():
        order = sorted(per_bucket.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0]))
        for i, (bucket, items) in enumerate(order):
            n = items if isinstance(items, int) else len(items)
            rows.append((ds if i == 0 else "", bucket_label(bucket), f"{bucket[0] / bucket[1]:.2f}", str(n)))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}"
                     for r in rows)
