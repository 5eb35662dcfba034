"""
SimpleTuner's `multidatabackend.json` -> a list of `DatasetSpec`, checked at start-up.

The file is a JSON list, one entry per dataset (`//` comments allowed, as the quickstarts write jsonc). Schema and
defaults: shared/specs/simpletuner_compat.md §2 (4.10.1). What we support: local folders of images
(`dataset_type: image`) and of edit reference images (`dataset_type: conditioning`), captions from sidecar .txt
files, file names, the instance prompt, or a JSONL/CSV/Parquet metadata table (the `parquet` block).

How keys are treated:
  - a key we use (`SPEC_KEYS`) is type-checked and stored;
  - a SimpleTuner key we accept but do not use (`IGNORED_KEYS`: S3/HF/webshart settings, cache tuning, curriculum
    keys, destructive clean-ups, ...) is listed once per dataset in a note;
  - anything else is an error naming the key, the dataset and the nearest valid key (a typo never passes silently).
Entries with `dataset_type` text_embeds / image_embeds / conditioning_image_embeds are skipped with a note: the
trainer manages its own caches. Other storage types (aws, csv, huggingface, ...) and video/audio datasets are errors.

Differences from SimpleTuner, on purpose:
  - `conditioning_data` may name a dataset that has no `dataset_type` (the LongCat-Image-Edit quickstarts omit it on
    the reference set): that dataset becomes a conditioning dataset, with a note. An explicit `dataset_type: image`
    there is an error.
  - LongCat-Image-Edit takes one reference image, so `conditioning_data` names exactly one dataset; every training
    dataset of an Edit run must have one. A T2I run ignores conditioning links and conditioning datasets (note).
  - `probability: 0` is an error (SimpleTuner silently reads it as 1.0); use `disabled: true`.
Paths are used as written: relative paths are relative to the working directory, as in SimpleTuner.
"""
import dataclasses
import difflib
import json
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
    "max_num_samples", "disable_validation",
}
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
grounding is_i2v bucket_strategy scan_for_errors vae_cache_scan_behaviour cache_file_suffix
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
class DatasetSpec:
    """One enabled local image dataset. Defaults: simpletuner_compat.md §2 (global flags in brackets there)."""
    id: str
    instance_data_dir: str
    dataset_type: str = "image"  # "image" (trained on) or "conditioning" (edit reference images)
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


def _check_keys(ds, entry: dict, ignored: list):
    for key in entry:
        if key in SPEC_KEYS:
            continue
        if key in IGNORED_KEYS:
            ignored.append(key)
            continue
        near = difflib.get_close_matches(key, sorted(SPEC_KEYS | IGNORED_KEYS), n=1, cutoff=0.6)
        _fail(ds, f"unknown key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))


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


def _build_spec(entry: dict, defaults: dict) -> DatasetSpec:
    ds = entry["id"]
    get = lambda k, d=None: entry[k] if entry.get(k) is not None else defaults.get(k, d)  # noqa: E731
    data_dir = entry.get("instance_data_dir")
    if not data_dir:
        _fail(ds, "instance_data_dir is missing")
    data_dir = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(data_dir):
        _fail(ds, f"instance_data_dir {data_dir} is not a folder")
    is_cond = entry.get("dataset_type") == "conditioning"
    spec = DatasetSpec(id=ds, instance_data_dir=data_dir, dataset_type="conditioning" if is_cond else "image")

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
    ctype = entry.get("conditioning_type")
    if ctype is not None:
        spec.conditioning_type = _choice(ds, "conditioning_type", ctype, ("reference_strict", "reference_loose"),
                                         unsupported=("controlnet", "mask", "segmentation"))
    return spec


def parse_datasets(entries, *, is_edit: bool = False, defaults: Optional[dict] = None,
                   log: Callable[[str], None] = print) -> list:
    """Validate a parsed multidatabackend list; returns the enabled image + conditioning `DatasetSpec`s, in order.

    `defaults`: top-level config.json values (resolution, resolution_type, caption_strategy, ...) that apply to
    every dataset that does not set them, as SimpleTuner's global flags do. `is_edit`: LongCat-Image-Edit run.
    """
    defaults = {k: v for k, v in (defaults or {}).items() if k in GLOBAL_DEFAULT_KEYS and v is not None}
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
        _check_keys(ds, entry, ignored)
        if _bool(ds, "disabled", entry.get("disabled", entry.get("disable", False))):
            notes.append(f"dataset {ds!r} is disabled, skipped")
            continue
        if dtype not in ("image", "conditioning"):
            _fail(ds, f"dataset_type {dtype!r} is not supported yet (this trainer reads image and conditioning "
                      "datasets)" if dtype in ("video", "audio", "eval", "caption") else
                      f"unknown dataset_type {dtype!r} (image, conditioning, text_embeds, image_embeds)")
        if (entry.get("type") or "local") != "local":
            _fail(ds, f"type {entry.get('type')!r} is not supported: only local folders (\"type\": \"local\")")
        if ignored:
            notes.append(f"dataset {ds!r}: SimpleTuner keys accepted but not used: {', '.join(sorted(ignored))}")
        raw.append(entry)

    specs = {e["id"]: _build_spec(e, defaults) for e in raw}
    all_ids = {e.get("id") for e in entries if isinstance(e, dict)}
    explicit = {e["id"]: e.get("dataset_type") is not None for e in raw}
    for spec in specs.values():
        if spec.dataset_type == "conditioning" and spec.conditioning_data:
            _fail(spec.id, "a conditioning dataset cannot itself have conditioning_data")
        for target in spec.conditioning_data:
            if target not in specs:
                state = "is disabled or not an image dataset" if target in all_ids else "does not exist"
                _fail(spec.id, f"conditioning_data names {target!r}, which {state}"
                               f" (enabled ids: {', '.join(sorted(specs))})")
            other = specs[target]
            if other.dataset_type != "conditioning":
                if explicit[target] or other.conditioning_data or target == spec.id:
                    _fail(spec.id, f"conditioning_data names {target!r}, which is a training image dataset; set "
                                   f"\"dataset_type\": \"conditioning\" on {target!r}")
                other.dataset_type, other.caption_strategy = "conditioning", None
                notes.append(f"dataset {target!r} is named by {spec.id!r} in conditioning_data: "
                             "used as its reference images (dataset_type conditioning)")
        if len(spec.conditioning_data) > 1:
            _fail(spec.id, f"LongCat-Image-Edit takes one reference image per sample; conditioning_data lists "
                           f"{len(spec.conditioning_data)} datasets")

    trains = [s for s in specs.values() if s.dataset_type == "image"]
    if is_edit:
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
    if not any(s.dataset_type == "image" for s in specs.values()):
        raise ConfigError("multidatabackend: no enabled image dataset to train on")
    for note in notes:
        log(f"note: {note}")
    return list(specs.values())


def load_datasets(path: str, *, is_edit: bool = False, defaults: Optional[dict] = None,
                  log: Callable[[str], None] = print) -> list:
    """Read a multidatabackend.json (jsonc allowed) and return `parse_datasets` of it."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.loads(strip_json_comments(f.read()))
    except FileNotFoundError:
        raise ConfigError(f"data_backend_config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return parse_datasets(entries, is_edit=is_edit, defaults=defaults, log=log)
