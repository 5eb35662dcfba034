"""Video files in and out with PyAV (bundled FFmpeg): MP4 writing, frame-accurate timestamp sampling, probing.

Reading (specs/vae_and_data.md §4.1):
  - threaded decoding (thread_type "AUTO"); frames are picked by presentation *timestamps*, never by decode order or
    by the stream's frame count, so VFR files, B-frames and files whose metadata lies all work;
  - fps resampling: target times t_k = start + k / fps; each target takes the decoded frame nearest to it (ties go to
    the earlier frame). Without fps every frame from the one nearest `start` on is returned. Upsampling repeats frames;
  - the container's display matrix (phone videos) is applied: frames come back as they are meant to be shown,
    rotated by multiples of 90 degrees (flips in the matrix are ignored);
  - every way a file can be unusable raises BadVideo(reason): missing video stream (audio-only), empty file,
    unreadable/corrupt/truncated data, no frames, fewer frames than asked for.
Writing (§4.2): libx264 yuv420p (even sizes: odd ones are edge-padded or refused), or lossless libx264rgb qp 0;
always to a temporary file in the same folder, renamed into place when complete.
"""

import os
import uuid
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

SEEK_MIN_S = 1.0  # only seek when the window starts this late; earlier windows decode from the start


class BadVideo(ValueError):
    """A video file that cannot give the frames asked for; `reason` says why (the sample should be dropped)."""

    def __init__(self, reason, path=None):
        self.reason, self.path = reason, None if path is None else str(path)
        super().__init__(f"{path}: {reason}" if path is not None else reason)

# -----------------------------------------------------------------------------
# writing


def to_uint8_frames(frames):
    """uint8 [F, H, W, 3] (numpy/torch) as is, or float [3, F, H, W] (optionally [1, 3, F, H, W]) in [-1, 1] mapped by
    round(clamp((x + 1) / 2, 0, 1) * 255) -> numpy uint8 [F, H, W, 3]."""
    x = frames
    if isinstance(x, np.ndarray) and x.dtype != np.uint8:
        x = torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            x = x[0] if x.ndim == 5 and x.shape[0] == 1 else x
            if x.ndim != 4 or x.shape[0] != 3:
                raise ValueError(f"float frames must be [3, F, H, W] in [-1, 1], got {tuple(x.shape)}")
            x = ((x.detach().float().cpu() + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 3, 0)
        elif x.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 [F, H, W, 3] or float [3, F, H, W], got {x.dtype}")
        x = x.cpu().numpy()
    if x.ndim != 4 or x.shape[-1] != 3 or 0 in x.shape:
        raise ValueError(f"uint8 frames must be [F, H, W, 3] with F, H, W > 0, got {x.shape}")
    return np.ascontiguousarray(x)


def _even(arr, pad_odd):
    F, H, W, _ = arr.shape
    if H % 2 == 0 and W % 2 == 0:
        return arr
    if not pad_odd:
        raise ValueError(f"yuv420p H.264 needs even width and height, got {W}x{H} (pass pad_odd=True to pad)")
    return np.pad(arr, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")  # repeat the last row/column


def _tmp_beside(path):
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def write_mp4(path, frames, fps=15, crf=18, preset="veryfast", lossless=False, pad_odd=True):
    """Encodes frames (see to_uint8_frames) to an H.264 file, atomically; returns the path.

    Default: libx264 yuv420p at `crf` (the release's demos write crf 18 at 15 fps). Odd sizes are padded by
    repeating the last row/column (pad_odd=False refuses them). lossless=True: libx264rgb qp 0, RGB, bit-exact."""
    path = Path(path)
    arr = to_uint8_frames(frames)
    arr = arr if lossless else _even(arr, pad_odd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    rate = Fraction(fps).limit_denominator(10000)
    try:
        with av.open(str(tmp), mode="w") as out:
            s = out.add_stream("libx264rgb" if lossless else "libx264", rate=rate)
            s.width, s.height = arr.shape[2], arr.shape[1]
            s.pix_fmt = "rgb24" if lossless else "yuv420p"
            s.options = {"qp": "0", "preset": preset} if lossless else {"crf": str(crf), "preset": preset}
            for a in arr:
                out.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
            out.mux(s.encode())  # flush the encoder
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_frames_png(directory, frames, start_index=0):
    """Writes frames (see to_uint8_frames) as directory/00000.png, 00001.png, ...; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(to_uint8_frames(frames), start_index):
        paths.append(directory / f"{i:05d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths

# -----------------------------------------------------------------------------
# reading


def _open(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise BadVideo("empty file (0 bytes)", path)
    try:
        c = av.open(str(path))
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise BadVideo(f"not a readable media file (corrupt or truncated?): {e}", path) from e
    if not c.streams.video:
        kinds = sorted({s.type for s in c.streams})
        c.close()
        raise BadVideo("no video stream (audio-only file)" if "audio" in kinds else
                       f"no video stream (streams: {', '.join(kinds) or 'none'})", path)
    vs = c.streams.video[0]
    vs.thread_type = "AUTO"  # frame + slice threads
    return c, vs


def _native_fps(vs):
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    return Fraction(rate) if rate else None


def _timed_frames(path, start):
    """Yields (time in s as a Fraction, relative to the stream start, VideoFrame); seeks near `start` when late."""
    for use_seek in ([True, False] if start >= SEEK_MIN_S else [False]):
        c, vs = _open(path)
        with c:
            tb, fps = vs.time_base, _native_fps(vs) or Fraction(25)
            t0 = vs.start_time
            if use_seek and t0 is not None:
                try:  # keyframe at or before one frame ahead of `start` (the nearest frame may precede it)
                    c.seek(int(t0 + (start - 1 / fps) / tb), stream=vs, backward=True, any_frame=False)
                except av.FFmpegError:
                    continue
            n = 0
            try:
                for frame in _decode(c, vs, path):
                    if frame.pts is None:  # no timestamps at all: assume constant rate from the first frame
                        t = Fraction(n) / fps
                    else:
                        t0 = frame.pts if t0 is None else t0
                        t = (frame.pts - t0) * tb
                    if use_seek and n == 0 and t > start:  # seek overshot: decode from the beginning instead
                        break
                    n += 1
                    yield t, frame
                else:
                    return
            except av.FFmpegError as e:
                raise BadVideo(f"decode error after {n} frames (corrupt or truncated): {e}", path) from e


def _decode(c, vs, path):
    """c.decode(vs), but a packet the demuxer flags as corrupt (cut short: truncated file) raises BadVideo.
    (Threaded decoders do not report such errors themselves; they just return fewer frames.)"""
    for packet in c.demux(vs):
        if packet.is_corrupt:
            raise BadVideo(f"corrupt packet at pts {packet.pts} (truncated file?)", path)
        yield from vs.decode(packet)


def _rotation_steps(frame):
    return int(round(frame.rotation / 90)) % 4  # counter-clockwise quarter turns that display the frame upright


def _to_rgb(frame):
    return np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), _rotation_steps(frame)))


def read_video(path, num_frames=None, fps=None, start=0.0):
    """uint8 [F, H, W, 3] frames as displayed (rotation applied).

    num_frames: how many to return (None: until the end; fewer available -> BadVideo). fps: sampling rate (None: the
    file's own frames, from the one nearest `start` on). start: seconds from the stream's first timestamp."""
    start = Fraction(start).limit_denominator(1_000_000)
    step = None if fps is None else 1 / Fraction(fps).limit_denominator(10000)
    out, last = [], None  # last: (frame, array) most recently converted, so repeated frames convert once

    def emit(frame):
        nonlocal last
        if last is None or last[0] is not frame:
            last = (frame, _to_rgb(frame))
        out.append(last[1])

    def full():
        return num_frames is not None and len(out) >= num_frames

    k, target = 0, start
    prev_t, prev, gap = None, None, Fraction(0)  # previous decoded frame, its time, the last inter-frame gap
    frames = _timed_frames(path, start)
    for t, frame in frames:
        if full():
            frames.close()  # closes the container now
            break
        if step is None and out:  # native rate: every frame after the first
            emit(frame)
        while not full() and t >= target and (step is not None or not out):
            emit(prev if prev is not None and target - prev_t <= t - target else frame)  # nearest; ties: earlier
            if step is None and not full() and out and last[0] is not frame:
                emit(frame)  # native rate: the first pick was the previous frame, so this one follows it
            k += 1
            target = start + k * step if step is not None else target
        gap = t - prev_t if prev is not None else gap
        prev_t, prev = t, frame
    if prev is not None and not full():  # targets after the last frame's time but before the clip's end
        dur = prev.duration * prev.time_base if prev.duration and prev.time_base else gap
        end = prev_t + dur
        while not full() and target < end and (step is not None or not out):
            emit(prev)
            k += 1
            target = start + k * step if step is not None else end
    if not out:
        raise BadVideo(f"no frames at or after {float(start):.3f} s" if prev is not None else "no frames decoded",
                       path)
    if num_frames is not None and len(out) < num_frames:
        raise BadVideo(f"too short: {len(out)} of {num_frames} frames available from {float(start):.3f} s"
                       + (f" at {float(1 / step):g} fps" if step is not None else ""), path)
    return np.stack(out)

# -----------------------------------------------------------------------------
# probing


def count_frames(path, decode=False):
    """Exact frame count: demuxed video packets with data (cheap), or decoded frames when decode=True."""
    c, vs = _open(path)
    with c:
        try:
            if decode:
                return sum(1 for _ in _decode(c, vs, path))
            n = 0
            for p in c.demux(vs):
                if p.is_corrupt:
                    raise BadVideo(f"corrupt packet at pts {p.pts} (truncated file?)", path)
                n += bool(p.size)
            return n
        except av.FFmpegError as e:
            raise BadVideo(f"error while counting frames (corrupt or truncated): {e}", path) from e


def probe_video(path, exact=False):
    """dict(frames, fps, width, height, duration, rotation, frames_source) without a full decode.

    frames: the container's count when it agrees with duration x fps (within 1), else counted by demuxing packets
    ('demux'); exact=True counts by decoding ('decode'). One frame is decoded to read the display rotation; width and
    height are as displayed (swapped for +-90 degrees), like read_video's frames. fps is the stream's average rate."""
    c, vs = _open(path)
    with c:
        fps = _native_fps(vs)
        tb = vs.time_base
        if vs.duration:
            duration = float(vs.duration * tb)
        elif c.duration:
            duration = c.duration / 1_000_000  # container duration is in microseconds
        else:
            duration = None
        meta_frames = vs.frames
        try:
            first = next(iter(_decode(c, vs, path)), None)
        except av.FFmpegError as e:
            raise BadVideo(f"cannot decode the first frame (corrupt?): {e}", path) from e
        if first is None:
            raise BadVideo("no frames decoded", path)
        rotation = first.rotation % 360  # counter-clockwise degrees, normalised to (-180, 180]
        rotation = rotation - 360 if rotation > 180 else rotation
        w, h = (first.height, first.width) if _rotation_steps(first) % 2 else (first.width, first.height)
    estimate = None if duration is None or fps is None else round(duration * float(fps))
    if exact:
        frames, source = count_frames(path, decode=True), "decode"
    elif meta_frames > 0 and (estimate is None or abs(meta_frames - estimate) <= 1):
        frames, source = meta_frames, "metadata"
    else:
        frames, source = count_frames(path), "demux"
    if duration is None and fps:
        duration = frames / float(fps)
    return dict(frames=frames, fps=None if fps is None else float(fps), width=w, height=h, duration=duration,
                rotation=rotation, frames_source=source)
