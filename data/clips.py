"""
Video clips for train_video.py: discovery (dataset folders of clips -> `Sample`s with a frame count, a frame sampling
and an optional I2V start frame) and loading (a clip -> [3, F, H, W] pixels, a start frame -> [3, 1, H, W]).

Discovery reuses data/discovery.py (the same Sample, DataIndex, data_report.json, discovery_cache.json, caption
strategies, pairing rules, max_num_samples); what is particular to video (shared/specs/vae_and_data.md §3.9-§3.11,
§4.1):
  - Files: .mp4 .mov .mkv .webm .avi .m4v (hidden and OS-junk folders skipped, as for images). Each is probed once,
    in threads: stream metadata plus one decoded frame for the display rotation, so W x H is the size as DISPLAYED
    (a phone clip stored sideways comes out upright, as read_video returns its frames). With `verify` (default),
    every packet is also demuxed: the frame count is then exact and a truncated file is caught here, not at step
    3000; no frame is decoded beyond the first. Results are cached by path and size + mtime_ns.
  - Frame sampling: the config's `framerate` None -> the file's own frames; a number -> frames picked by timestamp
    at that rate (read_video: the frame nearest each target time, so variable frame rates and 24/25/30 fps sources
    all give frames at the model's rate; a rate above the source repeats frames, with a warning). A clip always
    starts at the head of the file (`Sample.start` = 0), as SimpleTuner and the official LongCat trainer do; there
    is no random temporal crop yet.
  - Length: L = the frames available from the head at the sampling rate (native: the frame count; resampled: the
    duration x rate rounded down, from the shorter of the stream's duration and frames / fps, so a clip never comes
    up short in training). L < min_frames -> too_short (min_frames >= num_frames).
      bucket_strategy aspect_ratio: every clip trains on its first F = num_frames frames; L > max_frames -> too_long
        (SimpleTuner's filter).
      resolution_frames: F = the largest 1 + k * step <= min(L, max_frames) (step 4, or lcm(4, frame_interval)):
        clips train at their own 4k+1 length, and a clip over max_frames is cut to its head, not excluded.
  - Buckets: BucketPlanner on the displayed W x H, exactly as for images; the bucket key is (W, H, F), so a batch
    shares its frame count too.
  - I2V: a `conditioning` dataset of start-frame images named by the clip dataset's conditioning_data is paired by
    name as Edit references are (same relative path with any extension, then the bare stem if unique), and each
    start frame takes its clip's Geometry: when it is the clip's frame 0, it matches frame 0 of load_clip. Reasons
    as for Edit: unpaired_target and bad_reference (clip side); orphan_reference, target_excluded, unreadable,
    too_small (start-frame side). `spec.video.is_i2v` without conditioning_data leaves `Sample.conditioning` None:
    the trainer conditions on the clip's own first frame (its first latent frame, exact by the VAE's causality).
Reason codes of clips: unreadable (BadVideo: corrupt, truncated, empty, audio-only), missing_caption,
unreadable_caption, empty_caption, too_small, too_short, too_long, aspect_out_of_range, unpaired_target,
bad_reference, max_num_samples.
"""
import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from data.buckets import BucketPlanner, apply_geometry, bucket_label, check_alignment
from data.discovery import (DataError, DataIndex, Excluded, Sample, _caption, _counts, _File, _read_table,
                            _References, _scan, finish, group_buckets, keep_subset, list_images, load_cache,
                            reason_code, reference_exclusions, reference_problem, save_cache, skip_dirs,
                            stretch_warning)
from data.images import load_image, to_tensor
from data.video_io import count_frames, probe_video, read_video

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
PROBE_KEYS = ("frames", "fps", "width", "height", "duration", "rotation", "frames_source")


@dataclass
class _Clip(_File):
    info: Optional[dict] = None  # probe_video's dict (PROBE_KEYS); frames exact when frames_source is "demux"

    FIELD, KIND = "info", "video"

    @staticmethod
    def probe(path: str, verify: bool):
        return probe_clip(path, verify)

    @staticmethod
    def action(verify: bool) -> str:
        return "probing"

    def set(self, info):
        self.info, self.size = info, ((info["width"], info["height"]) if info else None)


def probe_clip(path: str, verify: bool):
    """(probe dict, None) or (None, "unreadable: why"). `verify`: count frames by demuxing every packet, which also
    catches a file cut short after its index (probe alone reads the first frame only)."""
    try:
        info = probe_video(path)
        if verify and info["frames_source"] != "demux":
            info["frames"], info["frames_source"] = count_frames(path), "demux"
        return {k: info[k] for k in PROBE_KEYS}, None
    except Exception as e:  # BadVideo, and whatever else a hostile file makes FFmpeg raise
        return None, f"unreadable: {getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'}"


def available_frames(info: dict, fps: Optional[float]) -> int:
    """Frames read_video can return from the head of the file at `fps` (None: the file's own), rounded down."""
    if fps is None:
        return info["frames"]
    spans = [d for d in (info["duration"], info["frames"] / info["fps"] if info["fps"] else None) if d]
    if not spans:  # neither a duration nor a rate: all we know is the frame count
        return info["frames"]
    return int(math.floor(min(spans) * fps + 1e-6))


def clip_frames(video, available: int):
    """(F, None) or (None, "too_short/too_long: ...") for a clip with `available` frames (rules in the docstring)."""
    rate = f" at {video.fps:g} fps" if video.fps else ""
    if available < video.min_frames:
        return None, f"too_short: {available} frames{rate}, under min_frames {video.min_frames}"
    if video.bucket_strategy == "aspect_ratio":
        if video.max_frames and available > video.max_frames:
            return None, f"too_long: {available} frames{rate}, over max_frames {video.max_frames}"
        return video.num_frames, None
    step = video.frames_step()
    usable = min(available, video.max_frames or available)
    frames = 1 + (usable - 1) // step * step
    if frames < video.num_frames:
        return None, (f"too_short: {available} frames{rate} give {frames} on the 1 + {step}k grid, under "
                      f"num_frames {video.num_frames}")
    return frames, None


def discover_videos(specs: list, *, seed: int = 0, alignment: int = 64, output_dir: Optional[str] = None,
                    verify: bool = True, log: Callable[[str], None] = print) -> DataIndex:
    """Walk every video dataset and its start-frame dataset: caption, probe, filter, bucket (W, H, F) and pair.
    Writes `output_dir/data_report.json` and the discovery cache when `output_dir` is given. Raises DataError when
    a video dataset ends up empty. `specs`: parse_datasets(..., is_video=True)."""
    check_alignment(alignment)
    specs = {s.id: s for s in specs}
    trains = [s for s in specs.values() if s.dataset_type == "video"]
    images = [s.id for s in specs.values() if s.dataset_type == "image"]
    if not trains:
        raise DataError("a video run needs a dataset_type video dataset (specs from parse_datasets(is_video=True))")
    if images:
        raise DataError(f"a video run trains video datasets only; got image dataset(s) {', '.join(images)}")
    missing = [t for s in trains for t in s.conditioning_data if t not in specs]
    if missing:
        raise DataError(f"conditioning_data names start-frame dataset(s) {', '.join(missing)} that are not given")
    skip, cache = skip_dirs(specs, output_dir), load_cache(output_dir)
    files = {s.id: _scan(list_images(s.instance_data_dir, skip, VIDEO_EXTENSIONS), verify, cache, log,
                          repr(s.id), record=_Clip) for s in trains}
    conds = {s.conditioning_data[0] for s in trains if s.conditioning_data}
    files.update({c: _scan(list_images(specs[c].instance_data_dir, skip), verify, cache, log, repr(c)) for c in conds})
    save_cache(output_dir, cache, files)

    excluded, samples, buckets, counts, warnings = [], {}, {}, {}, []
    ref_use = defaultdict(dict)  # start-frame dataset id -> rel -> "used", or why its clip was excluded
    for spec in trains:
        video = spec.video
        planner = BucketPlanner(spec, seed=seed, alignment=alignment)
        table = _read_table(spec.parquet) if spec.caption_strategy == "parquet" else None
        cond = specs[spec.conditioning_data[0]] if spec.conditioning_data else None
        refs = _References(files[cond.id]) if cond else None
        ref_planner = BucketPlanner(cond, seed=seed, alignment=alignment) if cond else None
        rows = []  # [file, reason, caption, geometry, start frame, F]
        for f in files[spec.id]:
            ref, why = refs.match(f.rel) if refs else (None, None)
            reason, caption, geom, frames = f.error, None, None, None
            if not reason:
                caption, reason = _caption(spec, f, table)
            reason = reason or planner.too_small(f.size)
            if not reason:
                frames, reason = clip_frames(video, available_frames(f.info, video.fps))
            if not reason:
                geom = planner.plan(f.size, f.rel)
                reason = planner.aspect_out_of_range(geom) or planner.too_large(f.size, geom)
            if not reason and cond:
                reason = reference_problem(ref, why, ref_planner)
            rows.append([f, reason, caption, geom, ref, frames])
        keep_subset(spec, rows)
        here, kept = [], []
        for f, reason, caption, geom, ref, frames in rows:
            if ref is not None and ref_use[cond.id].get(ref.rel) != "used":
                ref_use[cond.id][ref.rel] = f"{f.rel} ({reason_code(reason)})" if reason else "used"
            if reason:
                here.append((f.path, reason))
                continue
            sample = Sample(spec.id, f.path, f.rel, caption, *f.size, geom, f.fingerprint, frames=frames,
                            fps=video.fps, start=0.0, source_fps=f.info["fps"], source_frames=f.info["frames"])
            if ref is not None:
                sample.conditioning = Sample(cond.id, ref.path, ref.rel, None, *ref.size, geom, ref.fingerprint)
                warnings += [w for w in [stretch_warning(cond.id, ref, f)] if w]
            kept.append(sample)
        slow = [s for s in kept if video.fps and s.source_fps and s.source_fps < video.fps - 0.01]
        if slow:
            warnings.append(f"{spec.id}: {len(slow)} clip(s) are slower than framerate {video.fps:g} (e.g. "
                            f"{slow[0].rel} at {slow[0].source_fps:.3g} fps): their frames repeat")
        excluded += [Excluded(p, spec.id, r) for p, r in here]
        samples[spec.id] = kept
        buckets[spec.id] = group_buckets(kept)
        counts[spec.id] = _counts(spec, files[spec.id], here, len(kept))
        counts[spec.id]["buckets"] = {bucket_label(b): len(v) for b, v in buckets[spec.id].items()}
        counts[spec.id]["video"] = dataclasses.asdict(video)

    for cid in sorted(conds):
        cond = specs[cid]
        targets = [s.id for s in trains if cid in s.conditioning_data]
        planner = BucketPlanner(cond, seed=seed, alignment=alignment)
        here = reference_exclusions(cond, files[cid], ref_use[cid], targets, planner)
        excluded += [Excluded(p, cid, r) for p, r in here]
        counts[cid] = _counts(cond, files[cid], here, len(files[cid]) - len(here))
        counts[cid]["references_for"] = targets

    settings = {"seed": seed, "alignment": alignment, "kind": "video", "verify_videos": verify}
    index = DataIndex(specs, samples, buckets, excluded, counts, warnings, settings=settings)
    return finish(index, output_dir, f"video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")

# -----------------------------------------------------------------------------
# pixels


def frame_through(frame: np.ndarray, geom) -> np.ndarray:
    """uint8 [H, W, 3] frame -> the training frame: apply_geometry's result (PIL bicubic resize to geom.resize, then
    the crop box) without the PIL round trip when no resize is needed (a crop is a plain slice)."""
    if (frame.shape[1], frame.shape[0]) != tuple(geom.resize):
        frame = np.asarray(Image.fromarray(frame).resize(tuple(geom.resize), Image.Resampling.BICUBIC))
    left, top, right, bottom = geom.crop
    return frame[top:bottom, left:right]


def load_clip(sample: Sample) -> torch.Tensor:
    """float32 [3, F, H, W] in [-1, 1]: the sample's F frames (read_video at its fps and start), each resized and
    cropped with its Geometry exactly as an image is (see frame_through), scaled with to_tensor's arithmetic, so
    frame 0 equals load_start_frame of the same picture bit for bit.
    Raises BadVideo when the file cannot give them (it changed since discovery, or is damaged past its index)."""
    frames = read_video(sample.path, num_frames=sample.frames, fps=sample.fps, start=sample.start)
    w, h = sample.geometry.bucket
    out = np.empty((len(frames), h, w, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = frame_through(frame, sample.geometry)
    x = torch.from_numpy(out).permute(3, 0, 1, 2).contiguous()  # uint8 first: 4x less to move than float
    return x.float().div_(255.0).sub_(0.5).div_(0.5)  # in place, on a contiguous tensor: ~10x faster than out of it


def load_start_frame(sample: Sample) -> torch.Tensor:
    """float32 [3, 1, H, W] in [-1, 1]: an I2V start-frame image (a clip's `conditioning`) through its clip's
    Geometry, i.e. the 1-frame video the VAE encodes as the clean first latent frame. Raises BadSample."""
    return to_tensor(apply_geometry(load_image(sample.path), sample.geometry)).unsqueeze(1)


def start_frame_image(sample: Sample) -> Image.Image:
    """A clip's I2V start frame as an RGB image of its bucket size (validation, previews): its start-frame file when
    it has one, else its own first frame (is_i2v without conditioning_data); either through the clip's Geometry."""
    if sample.conditioning is not None:
        return apply_geometry(load_image(sample.conditioning.path), sample.geometry)
    first = read_video(sample.path, num_frames=1, fps=sample.fps, start=sample.start)[0]
    return Image.fromarray(np.ascontiguousarray(frame_through(first, sample.geometry)))
