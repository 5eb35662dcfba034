"""
SimpleTuner's `multidatabackend.json` -> a list of `DatasetSpec`, checked at start-up.

The file is a JSON list, one entry per dataset (`//` comments allowed, as the quickstarts write jsonc). Schema and
defaults: shared/specs/simpletuner_compat.md §2 (4.10.1). What we support: local folders of images
(`dataset_type: image`, image runs: train_image.py), of video clips (`dataset_type: video`, video runs: `is_video`,
train_video.py; each kind of run refuses the other's datasets) and of edit reference images or I2V start frames
(`dataset_type: conditioning`), captions from sidecar .txt files, file names, the instance prompt, or a
JSONL/CSV/Parquet metadata table (the `parquet` block).

How keys are treated:
  - a key we use (`SPEC_KEYS`) is type-checked and stored;
  - a SimpleTuner key we accept but do not use (`IGNORED_KEYS`: S3/HF/webshart settings, cache tuning, curriculum
    keys, destructive clean-ups, ...) is listed once per dataset in a note;
  - anything else is an error naming the key, the dataset and the nearest valid key (a typo never passes silently).
Entries with `dataset_type` text_embeds / image_embeds / conditioning_image_embeds are skipped with a note: the
trainer manages its own caches. Other storage types (aws, csv, huggingface, ...) and audio datasets are errors.

Video datasets (`VideoSpec`, simpletuner_compat.md §2.7, vae_and_data.md §3.9): the `video` block's num_frames,
min_frames, max_frames, is_i2v, bucket_strategy and frame_interval; `is_i2v` and `bucket_strategy` may also sit at the
top level of the entry (the LongCat-Video quickstart writes `"is_i2v": true` there; both places set and disagreeing
is an error). A `conditioning` dataset named by conditioning_data holds the I2V start frames (one image per clip,
same file name stem). The sampling rate is the config-level `framerate` (SimpleTuner's global flag, passed in
`defaults`): None trains on the file's own frames, a number samples frames by timestamp at that rate.
  - num_frames must be 4k+1 (LongCat-Video's VAE: the first frame, then 4 frames per latent frame; 93 is valid).
    SimpleTuner trims LongCat-Video clips to 8k+1 (93 -> 89); we do not. A wrong value is an error that names the
    two nearest valid counts. Default 93 (LongCat-Video's own length; SimpleTuner's framerate x 5 is 150 at its
    30 fps fallback, which is not 4k+1). min_frames defaults to num_frames and may not be smaller; max_frames, if
    set, may not be under min_frames. How clip lengths become F, too_short and too_long: data/clips.py.
  - is_i2v defaults to true when conditioning_data names a start-frame dataset, else false; is_i2v without
    conditioning_data means "condition on the clip's own first frame" (no start-frame files needed).
  - `resolution` defaults to 480 (pixel_area) for video datasets, LongCat-Video's 480p, not the image default 1024.

Differences from SimpleTuner, on purpose:
  - `conditioning_data` may name a dataset that has no `dataset_type` (the LongCat-Image-Edit quickstarts omit it on
    the reference set): that dataset becomes a conditioning dataset, with a note. An explicit `dataset_type: image`
    there is an error.
  - LongCat-Image-Edit takes one reference image, so `conditioning_data` names exactly one dataset; every training
    dataset of an Edit run must have one. A T2I run ignores conditioning links and conditioning datasets (note).
  - `probability: 0` is an error (SimpleTuner silently reads it as 1.0); use `disabled: true`.
  - A video dataset's `conditioning_data` names one start-frame dataset, like an Edit reference (SimpleTuner would
    generate an `i2v_first_frame` dataset of PNGs; we need none, see is_i2v above).
Paths are used as written: relative paths are relative to the working directory, as in SimpleTuner.
"""
import dataclasses
import difflib
import json
import math
import os
from typing import Callable, Optional, Union

from config import ConfigError, strip_json_comments

# Keys of a SimpleTuner dataset entry that this trainer reads.
SPEC_KEYS = {
    "id", "type", "dataset_type", "disabled", "disable", "instance_data_dir", "caption_strategy", "instance_prompt",
    "prepend_instance_prompt", "only_instance_prompt", "disable_multiline_split", "parquet", "resolution",
    "resolution_type", "minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio",
    "maximum_aspect_ratio", "crop", "crop_style", "crop_aspect", "crop_aspect_buckets", "repeats", "probability",
    "cache_dir_vae", "conditioning_data", "conditioning_type", "train_batch_size", "skip_file_discovery",
    "max_num_samples", "disable_validation", "video", "is_i2v", "bucket_strategy",
}
VIDEO_KEYS = {"video", "is_i2v", "bucket_strategy"}  # read on video datasets only; noted as unused elsewhere
# Keys of SimpleTuner's dataset schema (simpletuner_compat.md §2.1-2.7) that we accept and do not use.
IGNORED_KEYS = set("""
default cache_dir text_embeds image_embeds conditioning_image_embeds cache_dir_conditioning_image_embeds
conditioning_image_embed_batch_size aws_bucket_name aws_region_name aws_endpoint_url aws_access_key_id
aws_secret_access_key aws_session_token aws_data_prefix aws_max_pool_connections csv_file csv_caption_column
csv_url_column csv_cache_dir csv_hash_filenames csv_shorten_filenames shorten_filenames dataset_name dataset_config
split revision data_files image_column video_column audio_column huggingface source metadata webshart
memory_filesystem_path memory_filesystem_size memory_filesystem_sudo metadata_backend metadata_update_interval
preserve_data_backend_cache caption_file_extensions caption_shuffle caption_filter_list text_cache_ondemand
text_cache_disable write_batch_size text_encoder_batch_size max_upscale_threshold start_epoch start_step end_epoch
end_step timestep_sampling_offset slider_strength is_regularisation_data is_regularization_data
vae_cache_clear_each_epoch vae_cache_ondemand vae_cache_disable compress_cache hash_filenames delete_unwanted_images
delete_problematic_images delete_nsfw_images source_dataset_id conditioning conditioning_config video audio
grounding scan_for_errors vae_cache_scan_behaviour cache_file_suffix
""".split())
PARQUET_KEYS = {
    "path", "filename_column", "caption_column", "fallback_caption_column", "identifier_includes_extension",
    "width_column", "height_column", "bbox_column",
}
# Top-level config.json options that act as defaults for every dataset (SimpleTuner's global flags).
GLOBAL_DEFAULT_KEYS = {
    "resolution", "resolution_type", "caption_strategy", "instance_prompt", "minimum_image_size", "maximum_image_size",
    "target_downsample_size", "crop", "crop_style", "crop_aspect", "cache_dir_vae",
}
# Top-level config.json options that apply to video datasets: kept apart, so image trainers need not define them.
VIDEO_DEFAULT_KEYS = {"framerate"}
VIDEO_BLOCK_KEYS = ("num_frames", "min_frames", "max_frames", "is_i2v", "bucket_strategy", "frame_interval")
BUCKET_STRATEGIES = ("aspect_ratio", "resolution_frames")
DEFAULT_NUM_FRAMES = 93  # LongCat-Video's training and inference length (about 6 s at 15 fps)
DEFAULT_VIDEO_RESOLUTION = 480  # LongCat-Video's 480p (pixel_area: about 480 x 480 pixels of area)
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt", "parquet")
EMBED_TYPES = ("text_embeds", "image_embeds", "conditioning_image_embeds")


@dataclasses.dataclass
class MetadataSpec:
    """The `parquet` block: a caption table in .jsonl / .json / .csv (stdlib) or .parquet (needs pyarrow)."""
    path: str
    filename_column: str = "filename"
    caption_column: str = "caption"
    fallback_caption_column: Optional[str] = None
    identifier_includes_extension: bool = False


@dataclasses.dataclass
class VideoSpec:
    """A video dataset's clip settings (the `video` block plus the config's `framerate`; rules in the docstring)."""
    num_frames: int = DEFAULT_NUM_FRAMES  # frames per training clip, 4k+1 (aspect_ratio: every clip has this many)
    min_frames: Optional[int] = None  # clips with fewer frames are excluded (too_short); default num_frames
    max_frames: Optional[int] = None  # aspect_ratio: longer clips are excluded (too_long); resolution_frames: cap
    is_i2v: bool = False  # image-to-video: the first latent frame is a clean start frame
    bucket_strategy: str = "aspect_ratio"  # aspect_ratio: (W, H, num_frames) buckets; resolution_frames: (W, H, F)
    frame_interval: Optional[int] = None  # resolution_frames: clip lengths F with (F - 1) % lcm(4, interval) == 0
    fps: Optional[float] = None  # sampling rate (config `framerate`); None: the file's own frames

    def frames_step(self) -> int:
        """resolution_frames: the step of the allowed lengths F = 1 + k * step (4, or a multiple of 4)."""
        return 4 if not self.frame_interval else math.lcm(4, self.frame_interval)


@dataclasses.dataclass
class DatasetSpec:
    """One enabled local dataset. Defaults: simpletuner_compat.md §2 (global flags in brackets there)."""
    id: str
    instance_data_dir: str
    dataset_type: str = "image"  # "image" or "video" (trained on), or "conditioning" (edit references, start frames)
    type: str = "local"
    caption_strategy: Optional[str] = "filename"  # None for conditioning datasets
    instance_prompt: Optional[Union[str, list]] = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    disable_multiline_split: bool = False
    parquet: Optional[MetadataSpec] = None
    resolution: float = 1024
    resolution_type: str = "pixel_area"  # pixel (short edge) | area (megapixels) | pixel_area (edge -> area)
    minimum_image_size: Optional[float] = None
    maximum_image_size: Optional[float] = None
    target_downsample_size: Optional[float] = None
    minimum_aspect_ratio: Optional[float] = None
    maximum_aspect_ratio: Optional[float] = None
    crop: bool = False
    crop_style: str = "random"  # random | center | corner ("centre" is read as "center")
    crop_aspect: str = "square"  # square | preserve | closest | random (only with crop=True)
    crop_aspect_buckets: Optional[list] = None  # floats, or {"aspect": a, "weight": w} dicts
    repeats: int = 0  # extra passes per epoch: each sample is seen repeats + 1 times
    probability: float = 1.0
    cache_dir_vae: Optional[str] = None
    conditioning_data: list = dataclasses.field(default_factory=list)
    conditioning_type: Optional[str] = None
    train_batch_size: Optional[int] = None
    skip_file_discovery: tuple = ()
    max_num_samples: Optional[int] = None
    disable_validation: bool = False
    video: Optional[VideoSpec] = None  # set on video datasets only


def _fail(ds: str, msg: str):
    raise ConfigError(f"multidatabackend: dataset {ds!r}: {msg}")


def _num(ds, key, val, *, integer=False, positive=False, nonneg=False):
    if val is None:
        return None
    if isinstance(val, str):
        try:
            val = float(val)
        except ValueError:
            _fail(ds, f"{key} must be a number, got {val!r}")
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        _fail(ds, f"{key} must be a number, got {val!r}")
    if integer:
        if float(val) != int(val):
            _fail(ds, f"{key} must be a whole number, got {val!r}")
        val = int(val)
    if positive and val <= 0:
        _fail(ds, f"{key} must be > 0, got {val!r}")
    if nonneg and val < 0:
        _fail(ds, f"{key} must be >= 0, got {val!r}")
    return val


def _bool(ds, key, val):
    if isinstance(val, bool):
        return val
    if isinstance(val, str) and val.lower() in ("true", "false", "1", "0", "yes", "no"):
        return val.lower() in ("true", "1", "yes")
    if val in (0, 1):
        return bool(val)
    _fail(ds, f"{key} must be true or false, got {val!r}")


def _choice(ds, key, val, choices, unsupported=()):
    if val in unsupported:
        _fail(ds, f"{key} {val!r} is not supported yet (supported: {', '.join(choices)})")
    if val not in choices:
        near = difflib.get_close_matches(str(val), choices, n=1)
        _fail(ds, f"{key} {val!r} is not one of {', '.join(choices)}" + (f"; did you mean {near[0]!r}?" if near else ""))
    return val


def _check_keys(ds, entry: dict, ignored: list, is_video: bool = False):
    for key in entry:
        if key in SPEC_KEYS and (is_video or key not in VIDEO_KEYS):
            continue
        if key in IGNORED_KEYS or key in VIDEO_KEYS:
            ignored.append(key)
            continue
        if key in VIDEO_BLOCK_KEYS:
            _fail(ds, f"{key!r} belongs in the \"video\" block: \"video\": {{\"{key}\": ...}}")
        near = difflib.get_close_matches(key, sorted(SPEC_KEYS | IGNORED_KEYS), n=1, cutoff=0.6)
        _fail(ds, f"unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))


def nearest_frame_counts(n: int) -> tuple:
    """The valid (4k+1) frame counts either side of n."""
    low = n - (n - 1) % 4
    return (low, low + 4) if low != n else (n,)


def _video_spec(ds, entry: dict, defaults: dict, has_start_frames: bool) -> VideoSpec:
    block = entry.get("video") or {}
    if not isinstance(block, dict):
        _fail(ds, "\"video\" must be an object, e.g. {\"num_frames\": 93}")
    for key in block:
        if key not in VIDEO_BLOCK_KEYS:
            near = difflib.get_close_matches(key, VIDEO_BLOCK_KEYS, n=1, cutoff=0.6)
            _fail(ds, f"unknown video key {key!r}" + (f"; did you mean {near[0]!r}?" if near else "") +
                  f" (video keys: {', '.join(VIDEO_BLOCK_KEYS)})")
    for key in ("is_i2v", "bucket_strategy"):  # allowed in both places; they must agree
        if entry.get(key) is not None and block.get(key) is not None and entry[key] != block[key]:
            _fail(ds, f"{key} is {entry[key]!r} at the top level but {block[key]!r} in the video block")
    get = lambda k: block[k] if block.get(k) is not None else entry.get(k)  # noqa: E731
    v = VideoSpec()
    n = _num(ds, "video.num_frames", DEFAULT_NUM_FRAMES if block.get("num_frames") is None else block["num_frames"],
             integer=True, positive=True)  # 0 is an error, not the default
    if (n - 1) % 4:
        _fail(ds, f"video.num_frames {n} is not 4k+1: LongCat-Video's VAE encodes the first frame alone and then 4 "
                  f"frames per latent frame, so (num_frames - 1) % 4 must be 0; nearest valid: "
                  f"{' or '.join(map(str, nearest_frame_counts(n)))}")
    v.num_frames = n
    v.min_frames = _num(ds, "video.min_frames", block.get("min_frames"), integer=True, positive=True) or n
    if v.min_frames < n:
        _fail(ds, f"video.min_frames {v.min_frames} is below num_frames {n}: a clip needs num_frames frames")
    v.max_frames = _num(ds, "video.max_frames", block.get("max_frames"), integer=True, positive=True)
    if v.max_frames is not None and v.max_frames < v.min_frames:
        _fail(ds, f"video.max_frames {v.max_frames} is below min_frames {v.min_frames}: no clip could pass")
    i2v = get("is_i2v")
    if i2v is not None and not _bool(ds, "is_i2v", i2v) and has_start_frames:
        _fail(ds, "conditioning_data names a start-frame dataset, but is_i2v is false; set \"is_i2v\": true "
                  "(or drop conditioning_data for text-to-video)")
    v.is_i2v = has_start_frames if i2v is None else _bool(ds, "is_i2v", i2v)
    v.bucket_strategy = _choice(ds, "video.bucket_strategy", get("bucket_strategy") or "aspect_ratio",
                                BUCKET_STRATEGIES)
    v.frame_interval = _num(ds, "video.frame_interval", block.get("frame_interval"), integer=True, positive=True)
    v.fps = _num(ds, "framerate", defaults.get("framerate"), positive=True)
    return v


def _metadata_spec(ds, block, data_dir) -> MetadataSpec:
    if not isinstance(block, dict) or not block.get("path"):
        _fail(ds, "caption_strategy 'parquet' needs a \"parquet\": {\"path\": ...} block naming a .jsonl/.csv/.parquet")
    for key in block:
        if key not in PARQUET_KEYS:
            near = difflib.get_close_matches(key, sorted(PARQUET_KEYS), n=1, cutoff=0.6)
            _fail(ds, f"unknown parquet key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
    path = os.path.expanduser(str(block["path"]))
    if not os.path.isfile(path) and os.path.isfile(os.path.join(data_dir, path)):
        path = os.path.join(data_dir, path)  # also accept a table that lives next to the images
    if not os.path.isfile(path):
        _fail(ds, f"parquet.path {block['path']!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".json", ".csv", ".parquet"):
        _fail(ds, f"parquet.path must be a .jsonl, .json, .csv or .parquet file, got {path!r}")
    if ext == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            _fail(ds, f"reading {path} needs pyarrow (pip install pyarrow), or convert the table to .jsonl or .csv")
    return MetadataSpec(
        path=os.path.abspath(path),
        filename_column=str(block.get("filename_column") or "filename"),
        caption_column=str(block.get("caption_column") or "caption"),
        fallback_caption_column=block.get("fallback_caption_column"),
        identifier_includes_extension=_bool(ds, "parquet.identifier_includes_extension",
                                            block.get("identifier_includes_extension", False)),
    )


def _aspect_buckets(ds, val):
    if val is None:
        return None
    if not isinstance(val, list) or not val:
        _fail(ds, "crop_aspect_buckets must be a non-empty list of aspect ratios (floats or {aspect, weight} dicts)")
    out = []
    for b in val:
        if isinstance(b, dict):
            a = b.get("aspect", b.get("aspect_ratio"))
            out.append({"aspect": _num(ds, "crop_aspect_buckets.aspect", a, positive=True),
                        "weight": _num(ds, "crop_aspect_buckets.weight", b.get("weight", 1.0), nonneg=True)})
        else:
            out.append({"aspect": _num(ds, "crop_aspect_buckets", b, positive=True), "weight": 1.0})
    return out


def _build_spec(entry: dict, defaults: dict, is_video: bool = False) -> DatasetSpec:
    ds = entry["id"]
    get = lambda k, d=None: entry[k] if entry.get(k) is not None else defaults.get(k, d)  # noqa: E731
    data_dir = entry.get("instance_data_dir")
    if not data_dir:
        _fail(ds, "instance_data_dir is missing")
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
        _fail(ds, f"instance_data_dir {data_dir} is not a folder")
    is_cond = entry.get("dataset_type") == "conditioning"
    dtype = "conditioning" if is_cond else "video" if entry.get("dataset_type") == "video" else "image"
    spec = DatasetSpec(id=ds, instance_data_dir=data_dir, dataset_type=dtype)
    if is_video:  # every dataset of a video run: LongCat-Video's 480p unless set (start frames take their clip's size)
        defaults = {"resolution": DEFAULT_VIDEO_RESOLUTION, **defaults}

    strategy = None if is_cond else get("caption_strategy", "filename")  # conditioning sets have no captions
    spec.caption_strategy = strategy and _choice(ds, "caption_strategy", strategy, CAPTION_STRATEGIES,
                                                 unsupported=("csv", "huggingface", "webshart"))
    prompt = get("instance_prompt")
    if prompt is not None and not (isinstance(prompt, str) or
                                   (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
        _fail(ds, "instance_prompt must be a string or a list of strings")
    spec.instance_prompt = prompt
    for key in ("prepend_instance_prompt", "only_instance_prompt", "disable_multiline_split", "crop",
                "disable_validation"):
        setattr(spec, key, _bool(ds, key, get(key, getattr(spec, key))))
    if not is_cond:
        needs_prompt = spec.caption_strategy == "instanceprompt" or spec.only_instance_prompt
        if (needs_prompt or spec.prepend_instance_prompt) and not prompt:
            _fail(ds, "instance_prompt is empty, but caption_strategy / *_instance_prompt need it")
        if spec.prepend_instance_prompt and not isinstance(prompt, str):
            _fail(ds, "prepend_instance_prompt needs a single instance_prompt string")
        if spec.caption_strategy == "parquet":
            spec.parquet = _metadata_spec(ds, entry.get("parquet"), data_dir)

    spec.resolution_type = _choice(ds, "resolution_type", get("resolution_type", "pixel_area"),
                                   ("pixel", "area", "pixel_area"))
    spec.resolution = _num(ds, "resolution", get("resolution", 1024), positive=True)
    if spec.resolution_type == "area" and spec.resolution > 100:
        _fail(ds, f"resolution {spec.resolution} with resolution_type 'area' means megapixels; did you mean "
                  "resolution_type 'pixel_area'?")
    if spec.resolution_type != "area" and spec.resolution <= 10:
        _fail(ds, f"resolution {spec.resolution} is in pixels for resolution_type {spec.resolution_type!r}; "
                  "did you mean resolution_type 'area' (megapixels)?")
    for key in ("minimum_image_size", "maximum_image_size", "target_downsample_size", "minimum_aspect_ratio",
                "maximum_aspect_ratio"):
        setattr(spec, key, _num(ds, key, get(key), positive=True))
    if (spec.maximum_image_size is None) != (spec.target_downsample_size is None):
        _fail(ds, "maximum_image_size and target_downsample_size must be set together")
    if spec.minimum_aspect_ratio and spec.maximum_aspect_ratio and spec.minimum_aspect_ratio > spec.maximum_aspect_ratio:
        _fail(ds, "minimum_aspect_ratio is larger than maximum_aspect_ratio")
    style = get("crop_style", "random")
    spec.crop_style = _choice(ds, "crop_style", "center" if style == "centre" else style,
                              ("random", "center", "corner"), unsupported=("face",))
    spec.crop_aspect = _choice(ds, "crop_aspect", get("crop_aspect", "square"),
                               ("square", "preserve", "closest", "random"))
    spec.crop_aspect_buckets = _aspect_buckets(ds, entry.get("crop_aspect_buckets"))
    if spec.crop and spec.crop_aspect in ("closest", "random") and not spec.crop_aspect_buckets:
        _fail(ds, f"crop_aspect {spec.crop_aspect!r} needs crop_aspect_buckets")

    spec.repeats = _num(ds, "repeats", entry.get("repeats") or 0, integer=True, nonneg=True)
    spec.probability = _num(ds, "probability", entry.get("probability", 1.0), nonneg=True)
    if spec.probability == 0:
        _fail(ds, "probability 0 would never draw this dataset; use \"disabled\": true to leave it out")
    spec.train_batch_size = _num(ds, "train_batch_size", entry.get("train_batch_size"), integer=True, positive=True)
    spec.max_num_samples = _num(ds, "max_num_samples", entry.get("max_num_samples"), integer=True, positive=True)
    spec.cache_dir_vae = get("cache_dir_vae")
    skip = entry.get("skip_file_discovery") or ""
    spec.skip_file_discovery = tuple(skip.replace(",", " ").split()) if isinstance(skip, str) else tuple(skip)

    links = entry.get("conditioning_data") or []
    links = [links] if isinstance(links, str) else links
    if not isinstance(links, list) or not all(isinstance(x, str) for x in links):
        _fail(ds, "conditioning_data must be a dataset id or a list of ids")
    spec.conditioning_data = list(links)
    if dtype == "video":
        spec.video = _video_spec(ds, entry, defaults, has_start_frames=bool(links))
    ctype = entry.get("conditioning_type")
    if ctype is not None:
        spec.conditioning_type = _choice(ds, "conditioning_type", ctype, ("reference_strict", "reference_loose"),
                                         unsupported=("controlnet", "mask", "segmentation"))
    return spec


def parse_datasets(entries, *, is_edit: bool = False, is_video: bool = False, defaults: Optional[dict] = None,
                   log: Callable[[str], None] = print) -> list:
    """Validate a parsed multidatabackend list; returns the enabled training + conditioning `DatasetSpec`s, in order.

    `defaults`: top-level config.json values (resolution, resolution_type, caption_strategy, ..., and `framerate`
    for video runs) that apply to every dataset that does not set them, as SimpleTuner's global flags do.
    `is_edit`: LongCat-Image-Edit run. `is_video`: LongCat-Video run (trains `video` datasets; their start-frame
    `conditioning` datasets come along).
    """
    if is_edit and is_video:
        raise ValueError("parse_datasets: is_edit and is_video are exclusive (an I2V video run links start frames "
                         "through conditioning_data on its own)")
    keys = GLOBAL_DEFAULT_KEYS | (VIDEO_DEFAULT_KEYS if is_video else set())
    defaults = {k: v for k, v in (defaults or {}).items() if k in keys and v is not None}
    if not isinstance(entries, list):
        raise ConfigError("multidatabackend: expected a JSON list of dataset entries")
    raw, seen, notes = [], set(), []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"multidatabackend: entry {i} is not a JSON object")
        ds = entry.get("id")
        if not isinstance(ds, str) or not ds.strip():
            raise ConfigError(f"multidatabackend: entry {i} has no \"id\" (every dataset needs a unique id)")
        if ds in seen:
            raise ConfigError(f"multidatabackend: dataset id {ds!r} is used twice; ids must be unique")
        seen.add(ds)
        dtype = entry.get("dataset_type") or "image"
        if dtype in EMBED_TYPES:
            notes.append(f"dataset {ds!r} ({dtype}) skipped: this trainer manages its own latent and text caches")
            continue
        ignored = []
        _check_keys(ds, entry, ignored, is_video=is_video and dtype == "video")
        if _bool(ds, "disabled", entry.get("disabled", entry.get("disable", False))):
            notes.append(f"dataset {ds!r} is disabled, skipped")
            continue
        if dtype == "video" and not is_video:
            _fail(ds, "dataset_type 'video' is not supported yet in an image run (train_image.py trains image "
                      "datasets); train videos with train_video.py")
        if dtype not in ("image", "conditioning", "video"):
            _fail(ds, f"dataset_type {dtype!r} is not supported yet (this trainer reads image, video and conditioning "
                      "datasets)" if dtype in ("audio", "eval", "caption") else
                      f"unknown dataset_type {dtype!r} (image, video, conditioning, text_embeds, image_embeds)")
        if (entry.get("type") or "local") != "local":
            _fail(ds, f"type {entry.get('type')!r} is not supported: only local folders (\"type\": \"local\")")
        if ignored:
            notes.append(f"dataset {ds!r}: SimpleTuner keys accepted but not used: {', '.join(sorted(ignored))}")
        raw.append(entry)

    specs = {e["id"]: _build_spec(e, defaults, is_video) for e in raw}
    train_type = "video" if is_video else "image"
    all_ids = {e.get("id") for e in entries if isinstance(e, dict)}
    explicit = {e["id"]: e.get("dataset_type") is not None for e in raw}
    for spec in specs.values():
        if spec.dataset_type == "conditioning" and spec.conditioning_data:
            _fail(spec.id, "a conditioning dataset cannot itself have conditioning_data")
        for target in spec.conditioning_data:
            if target not in specs:
                state = "is disabled or not a local dataset" if target in all_ids else "does not exist"
                _fail(spec.id, f"conditioning_data names {target!r}, which {state}"
                               f" (enabled ids: {', '.join(sorted(specs))})")
            other = specs[target]
            if other.dataset_type != "conditioning":
                if explicit[target] or other.conditioning_data or target == spec.id:
                    _fail(spec.id, f"conditioning_data names {target!r}, which is a training {other.dataset_type} "
                                   f"dataset; set \"dataset_type\": \"conditioning\" on {target!r}")
                other.dataset_type, other.caption_strategy = "conditioning", None
                what = "start frames" if spec.dataset_type == "video" else "reference images"
                notes.append(f"dataset {target!r} is named by {spec.id!r} in conditioning_data: "
                             f"used as its {what} (dataset_type conditioning)")
        if len(spec.conditioning_data) > 1:
            one = ("LongCat-Video I2V takes one start frame per clip" if spec.dataset_type == "video" else
                   "LongCat-Image-Edit takes one reference image per sample")
            _fail(spec.id, f"{one}; conditioning_data lists {len(spec.conditioning_data)} datasets")

    trains = [s for s in specs.values() if s.dataset_type == train_type]
    if is_video:
        images = [s.id for s in specs.values() if s.dataset_type == "image"]
        if images:
            raise ConfigError(f"multidatabackend: a video run (train_video.py) trains dataset_type 'video' datasets; "
                              f"image dataset(s) {', '.join(map(repr, images))} cannot be used in it (train images "
                              "with train_image.py; I2V start frames go in a \"dataset_type\": \"conditioning\" "
                              "dataset named by the video dataset's conditioning_data)")
        for s in trains:
            if s.video.bucket_strategy == "resolution_frames" and s.video.max_frames is None:
                notes.append(f"dataset {s.id!r}: bucket_strategy resolution_frames without video.max_frames: every "
                             "clip trains at its full length (rounded down to 4k+1)")
    elif is_edit:
        missing = [s.id for s in trains if not s.conditioning_data]
        if missing:
            raise ConfigError(f"multidatabackend: an Edit run needs reference images: dataset(s) "
                              f"{', '.join(map(repr, missing))} have no conditioning_data naming a reference dataset")
    else:
        conds = [s.id for s in specs.values() if s.dataset_type == "conditioning"]
        if conds:
            notes.append(f"text-to-image run: conditioning dataset(s) {', '.join(conds)} are not used")
        for s in trains:
            s.conditioning_data = []
        specs = {k: s for k, s in specs.items() if s.dataset_type == "image"}
    linked = {t for s in specs.values() for t in s.conditioning_data}
    for s in list(specs.values()):
        if s.dataset_type == "conditioning" and s.id not in linked:
            notes.append(f"conditioning dataset {s.id!r} is not named by any conditioning_data, not used")
            del specs[s.id]
        elif s.conditioning_type == "reference_loose":
            notes.append(f"dataset {s.id!r}: reference_loose is treated as reference_strict (the reference takes "
                         "its target's resize and crop, as the official trainer does)")
    if not any(s.dataset_type == train_type for s in specs.values()):
        raise ConfigError(f"multidatabackend: no enabled {train_type} dataset to train on" +
                          (" (a video run trains \"dataset_type\": \"video\" datasets)" if is_video else ""))
    for note in notes:
        log(f"note: {note}")
    return list(specs.values())


def load_datasets(path: str, *, is_edit: bool = False, is_video: bool = False, defaults: Optional[dict] = None,
                  log: Callable[[str], None] = print) -> list:
    """Read a multidatabackend.json (jsonc allowed) and return `parse_datasets` of it."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.loads(strip_json_comments(f.read()))
    except FileNotFoundError:
        raise ConfigError(f"data_backend_config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return parse_datasets(entries, is_edit=is_edit, is_video=is_video, defaults=defaults, log=log)
