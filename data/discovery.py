"""
Discovery: dataset folders -> `Sample` records (caption, original size, frozen geometry, edit reference), plus a
report of every file left out and why.

Follows SimpleTuner's data path (shared/specs/vae_and_data.md §3.2-3.4, §3.8, §3.10) with the changes its §6.3 and
§7 recommend:
  - Files: `os.walk(followlinks=True)` of `instance_data_dir`, hidden and OS-junk folders skipped, every real path
    (and every real folder, against symlink loops) visited once, extensions = what PIL can decode. Nothing is ever
    written into a dataset folder (SimpleTuner writes its bucket JSONs there); `output_dir` and `cache_dir_vae`
    folders that sit inside a dataset folder are skipped, so written images never become training data.
  - Every image is decoded once (a thread pool; `verify_images=False` reads headers only) so corrupt and truncated
    files are excluded at start-up, not at step 3000. Results are cached in `output_dir/discovery_cache.json`,
    keyed by path and fingerprint (size + a hash of the bytes), so a restart only decodes new or changed files.
  - Captions: `textfile` (`<stem>.txt`, one variant per non-empty line unless `disable_multiline_split`;
    a missing file EXCLUDES the image, where SimpleTuner aborts), `filename` (stem, `_` -> space),
    `instanceprompt`, and `parquet` (a .jsonl / .json / .csv table, or .parquet with pyarrow, looked up by relative
    path or bare name, with or without extension). `prepend_instance_prompt` / `only_instance_prompt` as SimpleTuner.
  - Edit pairing (reference = `conditioning_data` dataset): same relative path and name first (SimpleTuner's rule),
    then the same relative path with any extension, then the same bare file name if it is unique (musubi's rule).
    The reference takes its target's Geometry unchanged: it is resized to the target's `resize` size and cut with
    the target's crop box, as the official LongCat trainer resizes the reference exactly like the target. A
    reference whose aspect ratio is off by more than 5% is therefore stretched; it is kept, and listed under
    `warnings` in the report. Unpaired targets and unused references are excluded and reported at start-up (in
    SimpleTuner a missing reference crashes the training step).
  - `max_num_samples` keeps a subset seeded by the dataset id only (as SimpleTuner), so it survives a seed change.
Exclusion reasons are "code: detail" strings; the codes: unreadable, missing_caption, unreadable_caption,
empty_caption, too_small, aspect_out_of_range, unpaired_target, bad_reference, max_num_samples (training images);
unreadable, too_small, orphan_reference, target_excluded (references).
Video runs (a `video` dataset among the specs) are discovered by data/clips.py, with the same records, report and
cache; `discover` hands them over.
"""
import csv
import json
import math
import os
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Union

from checkpoint import atomic_write_json
from data.buckets import BucketPlanner, Geometry, bucket_label, check_alignment, format_bucket_table
from data.cache import content_fingerprint
from data.images import IMAGE_EXTENSIONS, BadSample, image_size, probe_image

JUNK_DIRS = {"__MACOSX", "@eaDir", "$RECYCLE.BIN", "System Volume Information", "__pycache__", "lost+found"}
REPORT_NAME, CACHE_NAME = "data_report.json", "discovery_cache.json"
ASPECT_WARN = 0.05  # relative aspect difference between a reference and its target that earns a warning


class DataError(RuntimeError):
    """The data cannot be trained on (nothing usable, a dataset left empty, every bucket pruned)."""


class Excluded(NamedTuple):
    path: str
    dataset_id: str
    reason: str  # "code: detail"


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


@dataclass
class Sample:
    """One training image or video clip (or the edit reference / I2V start frame attached to one). Sizes are as
    displayed: EXIF-upright images, rotation-applied videos. The video fields are None on images."""
    dataset_id: str
    path: str  # absolute path
    rel: str  # path relative to the dataset's instance_data_dir, posix separators
    caption: Optional[Union[str, list]]  # a list holds caption variants (multi-line .txt); None for references
    width: int
    height: int
    geometry: Geometry
    fingerprint: str  # f"{st_size}-{content hash}" of the source file (data.cache.content_fingerprint)
    conditioning: Optional["Sample"] = None  # the edit reference or I2V start frame, with this sample's geometry
    frames: Optional[int] = None  # video: F, the frames of one training clip (4k+1)
    fps: Optional[float] = None  # video: the rate frames are sampled at (read_video's fps); None: the file's own
    start: float = 0.0  # video: seconds into the file where the clip starts (always the head, 0, for now)
    source_fps: Optional[float] = None  # video: the file's average frame rate
    source_frames: Optional[int] = None  # video: the file's frame count

    @property
    def bucket(self) -> tuple:
        """This sample's key in `DataIndex.buckets`: (W, H) for images, (W, H, F) for clips."""
        return self.geometry.bucket if self.frames is None else (*self.geometry.bucket, self.frames)


@dataclass
class _File:
    rel: str
    path: str
    fingerprint: str = ""
    size: Optional[tuple] = None
    error: Optional[str] = None  # "unreadable: ..." when the file cannot be used at all

    # what _scan needs to know about a kind of file: the discovery-cache field, the probe and how to read its result
    FIELD, KIND = "size", "image"

    @staticmethod
    def probe(path: str, verify: bool):
        return _probe(path, verify)

    @staticmethod
    def action(verify: bool) -> str:
        return "decoding" if verify else "reading the headers of"

    def set(self, size):
        self.size = tuple(size) if size else None


def list_images(root: str, skip: frozenset = frozenset(), extensions: frozenset = IMAGE_EXTENSIONS) -> list:
    """Sorted [(rel posix path, absolute path)] of the image files (or other `extensions`, lower case with the dot)
    under `root` (rules in the module docstring). A file reachable under several names (symlinks) is listed once,
    under its own name when that is one of them."""
    by_real, seen_dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs or real in skip:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in JUNK_DIRS)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in extensions:
                continue
            path = os.path.abspath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            by_real.setdefault(os.path.realpath(path), []).append((rel, path))
    out = [min(names, key=lambda n: (os.path.realpath(n[1]) != n[1], n[0])) for names in by_real.values()]
    return sorted(out)


def _probe(path: str, verify: bool):
    try:
        return (probe_image(path) if verify else image_size(path)), None
    except BadSample as e:
        return None, str(e)


def _scan(listed: list, verify: bool, cache: dict, log: Callable = print, name: str = "", record=_File) -> list:
    """`record` (_File, or data.clips._Clip) records for `listed`, probing (in threads) only what the cache does not
    already vouch for."""
    files, todo = [], []
    for rel, path in listed:
        f = record(rel, path)
        files.append(f)
        try:
            f.fingerprint = content_fingerprint(path, os.stat(path))  # size + hash of the bytes: keys follow content
        except OSError as e:  # e.g. a dangling symlink, no read permission
            f.error = f"unreadable: {type(e).__name__}: {e}"
            continue
        hit = cache.get(path)
        if hit and hit.get("fingerprint") == f.fingerprint and record.FIELD in hit and (hit["verified"] or not verify):
            f.set(hit[record.FIELD])
            f.error = hit["error"]
        else:
            todo.append(f)
    if todo:
        log(f"data: {record.action(verify)} {len(todo)} new or changed {record.KIND}(s) of {name}")
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL and FFmpeg run outside the GIL
        for f, (value, error) in zip(todo, pool.map(lambda f: record.probe(f.path, verify), todo)):
            f.set(value)
            f.error = error
            cache[f.path] = {"fingerprint": f.fingerprint, record.FIELD: value, "error": error, "verified": verify}
    return files


def _read_table(meta) -> dict:
    """Caption table -> {identifier: row}."""
    ext = os.path.splitext(meta.path)[1].lower()
    with open(meta.path, encoding="utf-8-sig", newline="") as f:
        if ext == ".jsonl":
            rows = [json.loads(line) for line in f if line.strip()]
        elif ext == ".json":
            rows = json.load(f)
        elif ext == ".csv":
            rows = list(csv.DictReader(f))
        else:
            import pyarrow.parquet as pq
            rows = pq.read_table(meta.path).to_pylist()
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{meta.path}: expected one object (row) per record")
    if rows and not any(meta.filename_column in r for r in rows):
        raise DataError(f"{meta.path}: no column {meta.filename_column!r} (columns: {', '.join(sorted(rows[0]))}); "
                        "set parquet.filename_column")
    table = {}
    for row in rows:
        ident = row.get(meta.filename_column)
        if ident is not None:
            key = str(ident).replace("\\", "/")
            table[key[2:] if key.startswith("./") else key] = row
    return table


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, (str, list)) and not v)


def _clean(caption):
    """Strip text, drop empty variants; a single variant becomes a plain string; nothing left -> None."""
    if isinstance(caption, list):
        caption = [str(c).strip() for c in caption if not _blank(c) and str(c).strip()]
        return None if not caption else caption[0] if len(caption) == 1 else caption
    return None if _blank(caption) or not str(caption).strip() else str(caption).strip()


def _caption(spec, f: _File, table: Optional[dict]):
    """(caption, None) or (None, exclusion reason)."""
    stem = os.path.splitext(f.rel)[0]
    if spec.only_instance_prompt or spec.caption_strategy == "instanceprompt":
        return _clean(spec.instance_prompt), None
    if spec.caption_strategy == "filename":
        caption = os.path.basename(stem).replace("_", " ")
    elif spec.caption_strategy == "textfile":
        txt = os.path.splitext(f.path)[0] + ".txt"
        try:
            with open(txt, encoding="utf-8-sig") as fh:
                text = fh.read()
        except FileNotFoundError:
            return None, f"missing_caption: no caption file {os.path.basename(txt)}"
        except (OSError, UnicodeDecodeError) as e:
            return None, f"unreadable_caption: {os.path.basename(txt)}: {type(e).__name__}"
        caption = text if spec.disable_multiline_split else text.splitlines()
    else:  # parquet
        name = os.path.basename(f.rel)
        keys = [f.rel, name, stem, os.path.basename(stem)]
        if not spec.parquet.identifier_includes_extension:
            keys = keys[2:] + keys[:2]
        row = next((table[k] for k in keys if k in table), None)
        if row is None:
            return None, f"missing_caption: no row for {f.rel} in {os.path.basename(spec.parquet.path)}"
        caption = row.get(spec.parquet.caption_column)
        if _clean(caption) is None and spec.parquet.fallback_caption_column:
            caption = row.get(spec.parquet.fallback_caption_column)
    caption = _clean(caption)
    if caption is None:
        return None, "empty_caption: the caption is empty"
    if spec.prepend_instance_prompt:
        prefix = spec.instance_prompt.strip()
        caption = [f"{prefix} {c}" for c in caption] if isinstance(caption, list) else f"{prefix} {caption}"
    return caption, None


class _References:
    """Name index of a conditioning dataset's files, for pairing (rules in the module docstring)."""

    def __init__(self, files: list):
        self.by_rel = {f.rel: f for f in files}
        self.by_stem, self.by_name = defaultdict(list), defaultdict(list)
        for f in files:
            stem = os.path.splitext(f.rel)[0]
            self.by_stem[stem].append(f)
            self.by_name[os.path.basename(stem)].append(f)

    def match(self, rel: str):
        """(reference _File, None) or (None, why not)."""
        if rel in self.by_rel:
            return self.by_rel[rel], None
        stem = os.path.splitext(rel)[0]
        for table, key in ((self.by_stem, stem), (self.by_name, os.path.basename(stem))):
            found = table.get(key, [])
            if len(found) == 1:
                return found[0], None
            if len(found) > 1:
                return None, f"{len(found)} references match {key!r} ({', '.join(f.rel for f in found)})"
        return None, f"no reference named {os.path.basename(stem)}.*"


@dataclass
class DataIndex:
    """Everything discovery found. `samples`/`buckets` hold training datasets only; references hang off
    `Sample.conditioning`. `counts[id]`: role, found, usable, excluded {code: n}, buckets {"WxH" or "WxH@F": n}."""
    specs: dict
    samples: dict
    buckets: dict  # dataset id -> {(W, H) or (W, H, F): [Sample]}
    excluded: list  # [Excluded(path, dataset_id, reason)]
    counts: dict
    warnings: list = field(default_factory=list)
    report_path: Optional[str] = None
    settings: dict = field(default_factory=dict)

    def all_samples(self) -> list:
        return [s for samples in self.samples.values() for s in samples]

    def bucket_table(self) -> str:
        return format_bucket_table(self.buckets)

    def write_report(self, path: str) -> str:
        """data_report.json: settings, counts per dataset and per reason, every excluded path, warnings."""
        by_reason = Counter(reason_code(e.reason) for e in self.excluded)
        report = {
            "settings": self.settings,
            "datasets": self.counts,
            "excluded_by_reason": dict(sorted(by_reason.items())),
            "excluded": [{"path": e.path, "dataset": e.dataset_id, "reason": reason_code(e.reason),
                          "detail": e.reason.partition(": ")[2]} for e in self.excluded],
            "warnings": self.warnings,
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_json(path, report)
        self.report_path = path
        return path

    def summary(self) -> str:
        n = sum(len(v) for v in self.samples.values())
        n_buckets = sum(len(v) for v in self.buckets.values())
        where = f" (reasons: {self.report_path})" if self.report_path else ""
        lines = [f"data: {n} training samples in {n_buckets} buckets from {len(self.samples)} dataset(s); "
                 f"{len(self.excluded)} file(s) excluded{where}"]
        for ds, c in self.counts.items():
            role = "" if c["role"] != "conditioning" else f" (references of {', '.join(c['references_for'])})"
            why = ", ".join(f"{k} {v}" for k, v in c["excluded"].items())
            lines.append(f"  {ds}{role}: {c['found']} found, {c['usable']} usable" + (f"; excluded: {why}" if why else ""))
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warning(s), e.g. {self.warnings[0]}")
        return "\n".join(lines)


def add_to_report(path: Optional[str], key: str, value) -> None:
    """Add one section (e.g. "cache_pruned") to an existing data_report.json."""
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        report[key] = value
        atomic_write_json(path, report)


def _counts(spec, files, excluded_here, usable) -> dict:
    return {"role": spec.dataset_type, "instance_data_dir": spec.instance_data_dir, "found": len(files),
            "usable": usable, "excluded": dict(sorted(Counter(reason_code(r) for _, r in excluded_here).items()))}


def skip_dirs(specs: dict, output_dir: Optional[str]) -> frozenset:
    """Real paths of folders discovery never enters: output_dir and every cache_dir_vae (see the module docstring)."""
    return frozenset(os.path.realpath(d) for d in [output_dir] + [s.cache_dir_vae for s in specs.values()] if d)


def load_cache(output_dir: Optional[str]) -> dict:
    """output_dir/discovery_cache.json as {path: entry}; empty when there is none or it is damaged."""
    path = os.path.join(output_dir, CACHE_NAME) if output_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            pass  # a damaged cache is only a slower start
    return {}


def save_cache(output_dir: Optional[str], cache: dict, files: dict) -> None:
    """Rewrite the cache with the current files only ({id: [_File]}), so entries of deleted files do not pile up."""
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_json(os.path.join(output_dir, CACHE_NAME),
                          {f.path: cache[f.path] for fs in files.values() for f in fs if f.path in cache})


def keep_subset(spec, rows: list) -> None:
    """`max_num_samples`: rows are [file, reason, ...]; the usable ones outside the seeded subset get a reason."""
    ok = [r for r in rows if not r[1]]
    if spec.max_num_samples and len(ok) > spec.max_num_samples:
        keep = set(random.Random(f"max_num_samples:{spec.id}").sample(range(len(ok)), spec.max_num_samples))
        for i, r in enumerate(ok):
            if i not in keep:
                r[1] = f"max_num_samples: not in the {spec.max_num_samples}-sample subset"


def reference_problem(ref, why: Optional[str], ref_planner) -> Optional[str]:
    """Exclusion reason of a target whose reference (start frame) is missing or unusable, else None."""
    if ref is None:
        return f"unpaired_target: {why}"
    problem = ref.error or ref_planner.too_small(ref.size)
    return f"bad_reference: {ref.rel}: {problem}" if problem else None


def stretch_warning(cond_id: str, ref, f) -> Optional[str]:
    """A warning when a reference's aspect differs from its target's by more than ASPECT_WARN (it gets stretched)."""
    skew = (ref.size[0] / ref.size[1]) / (f.size[0] / f.size[1])
    if abs(skew - 1) > ASPECT_WARN:
        return (f"{cond_id}/{ref.rel} is {ref.size[0]}x{ref.size[1]} but its target {f.rel} is "
                f"{f.size[0]}x{f.size[1]}: stretched to the target's geometry")
    return None


def reference_exclusions(cond, files: list, ref_use: dict, targets: list, planner) -> list:
    """[(path, reason)] of the files of a reference dataset that no kept target uses."""
    here = []
    for f in files:
        status = ref_use.get(f.rel)
        if status == "used":
            continue
        reason = f.error or planner.too_small(f.size) or (
            f"target_excluded: its target {status} was excluded" if status else
            f"orphan_reference: no file named {os.path.splitext(os.path.basename(f.rel))[0]}.* in "
            f"{', '.join(targets)}")
        here.append((f.path, reason))
    return here


def group_buckets(kept: list) -> dict:
    """{bucket key: [Sample]}, ordered by aspect, then key (sample.bucket: (W, H), or (W, H, F) for clips)."""
    per_bucket = defaultdict(list)
    for s in kept:
        per_bucket[s.bucket].append(s)
    return dict(sorted(per_bucket.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0])))


def finish(index: DataIndex, output_dir: Optional[str], what: str) -> DataIndex:
    """Write the report (with output_dir); raise DataError naming every training dataset left empty."""
    if output_dir:
        index.write_report(os.path.join(output_dir, REPORT_NAME))
    empty = [ds for ds, kept in index.samples.items() if not kept]
    if empty:
        where = f"every excluded file and its reason: {index.report_path}" if index.report_path else \
            "pass output_dir to get data_report.json listing every excluded file"
        parts = []
        for ds in empty:
            c = index.counts[ds]
            why = ", ".join(f"{k} {v}" for k, v in c["excluded"].items()) or f"none, the folder holds no {what}"
            parts.append(f"dataset {ds!r} ({c['instance_data_dir']}) has no usable samples: "
                         f"{c['found']} found; excluded: {why}")
        raise DataError("; ".join(parts) + f". {where}")
    return index


def discover(specs: list, *, seed: int = 0, alignment: int = 64, is_edit: bool = False, is_video: bool = False,
             output_dir: Optional[str] = None, verify_images: bool = True,
             log: Callable[[str], None] = print) -> DataIndex:
    """Walk every dataset, caption, filter, bucket and pair. Writes `output_dir/data_report.json` (and the
    discovery cache) when `output_dir` is given. Raises DataError when a training dataset ends up empty.
    A video run (`is_video`, or any `video` dataset in specs) goes to data.clips.discover_videos, with
    verify_images meaning "verify the clips and start frames"."""
    if is_video or any(s.dataset_type == "video" for s in specs):
        from data.clips import discover_videos  # clips.py builds on this module
        return discover_videos(specs, seed=seed, alignment=alignment, output_dir=output_dir, verify=verify_images,
                               log=log)
    check_alignment(alignment)
    specs = {s.id: s for s in specs}
    trains = [s for s in specs.values() if s.dataset_type == "image"]
    if is_edit and any(not s.conditioning_data or s.conditioning_data[0] not in specs for s in trains):
        raise DataError("an Edit run needs conditioning_data naming a reference dataset on every training dataset")
    skip, cache = skip_dirs(specs, output_dir), load_cache(output_dir)
    used = [s for s in specs.values() if s.dataset_type == "image" or is_edit]
    files = {s.id: _scan(list_images(s.instance_data_dir, skip), verify_images, cache, log, repr(s.id)) for s in used}
    save_cache(output_dir, cache, files)

    excluded, samples, buckets, counts, warnings = [], {}, {}, {}, []
    ref_use = defaultdict(dict)  # reference dataset id -> ref rel -> "used", or why its target was excluded
    for spec in trains:
        planner = BucketPlanner(spec, seed=seed, alignment=alignment)
        table = _read_table(spec.parquet) if spec.caption_strategy == "parquet" else None
        cond = specs[spec.conditioning_data[0]] if is_edit else None
        refs = _References(files[cond.id]) if cond else None
        ref_planner = BucketPlanner(cond, seed=seed, alignment=alignment) if cond else None
        rows = []  # [file, reason, caption, geometry, reference]
        for f in files[spec.id]:
            ref, why = refs.match(f.rel) if refs else (None, None)
            reason, caption, geom = f.error, None, None
            if not reason:
                caption, reason = _caption(spec, f, table)
            reason = reason or planner.too_small(f.size)
            if not reason:
                geom = planner.plan(f.size, f.rel)
                reason = planner.aspect_out_of_range(geom) or planner.too_large(f.size, geom)
            if not reason and cond:
                reason = reference_problem(ref, why, ref_planner)
            rows.append([f, reason, caption, geom, ref])
        keep_subset(spec, rows)
        here, kept = [], []
        for f, reason, caption, geom, ref in rows:
            if ref is not None and ref_use[cond.id].get(ref.rel) != "used":
                ref_use[cond.id][ref.rel] = f"{f.rel} ({reason_code(reason)})" if reason else "used"
            if reason:
                here.append((f.path, reason))
                continue
            sample = Sample(spec.id, f.path, f.rel, caption, *f.size, geom, f.fingerprint)
            if ref is not None:
                sample.conditioning = Sample(cond.id, ref.path, ref.rel, None, *ref.size, geom, ref.fingerprint)
                warnings += [w for w in [stretch_warning(cond.id, ref, f)] if w]
            kept.append(sample)
        excluded += [Excluded(p, spec.id, r) for p, r in here]
        samples[spec.id] = kept
        buckets[spec.id] = group_buckets(kept)
        counts[spec.id] = _counts(spec, files[spec.id], here, len(kept))
        counts[spec.id]["buckets"] = {bucket_label(b): len(v) for b, v in buckets[spec.id].items()}

    for cond in (s for s in specs.values() if s.dataset_type == "conditioning" and is_edit):
        targets = [s.id for s in trains if cond.id in s.conditioning_data]
        planner = BucketPlanner(cond, seed=seed, alignment=alignment)
        here = reference_exclusions(cond, files[cond.id], ref_use[cond.id], targets, planner)
        excluded += [Excluded(p, cond.id, r) for p, r in here]
        counts[cond.id] = _counts(cond, files[cond.id], here, len(files[cond.id]) - len(here))
        counts[cond.id]["references_for"] = targets

    settings = {"seed": seed, "alignment": alignment, "is_edit": is_edit, "verify_images": verify_images}
    index = DataIndex(specs, samples, buckets, excluded, counts, warnings, settings=settings)
    return finish(index, output_dir, "image files (.png, .jpg, .webp, ...: anything PIL decodes)")
