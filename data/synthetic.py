"""
Tiny procedural datasets for tests and CPU smoke runs: coloured shapes on coloured backgrounds, drawn with PIL, no
downloads, deterministic by seed (about 1 ms per image).

  make_synthetic_dataset(root, n, sizes, seed)       root/NNN.png + NNN.txt ("a red circle on a blue background")
  make_synthetic_edit_dataset(root, n, sizes, seed)  root/edits/NNN.png + .txt ("make the circle red") and
                                                     root/references/NNN.png: the same scene with the shape in
                                                     another colour; file names match 1-to-1
  make_synthetic_video_dataset(root, n, ...)        root/clips/NNN.mp4 + NNN.txt ("a red circle moving right on a
                                                     blue background": the shape crosses the frame that way) and
                                                     root/start_frames/NNN.png: each clip's first frame
  write_t2i_backend / write_edit_backend / write_i2v_backend   a SimpleTuner multidatabackend.json for them

The default sizes give three aspect buckets at resolution 64 (96x64 is resized and cropped into 128x64); the video
sizes give two (64x64 and 128x64), at 13 frames (4k+1) and 15 fps. Clips are lossless H.264 (libx264rgb), so shapes
stay crisp and the start-frame PNG equals the decoded frame 0 exactly.
CLI: python -m data.synthetic OUT [--edit | --video] [--n 32] [--seed 0] [--resolution 64] [--frames 13]
  writes OUT/images (or OUT/edits + OUT/references, or OUT/clips + OUT/start_frames), OUT/multidatabackend.json and
  caches under OUT/cache.
"""
import argparse
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((64, 64), (128, 64), (64, 128), (96, 64))  # at resolution 64: buckets 64x64, 128x64, 64x128
VIDEO_SIZES = ((64, 64), (128, 64))  # at resolution 64: buckets 64x64 and 128x64, no resizing
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def draw_scene(size: tuple, shape: str, colour: str, background: str, box: tuple) -> Image.Image:
    """One RGB image: `shape` filled with `colour` inside `box` (l, t, r, b) on a `background` canvas."""
    img = Image.new("RGB", size, COLOURS[background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        left, top, right, bottom = box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return img


def random_scene(rng: random.Random, size: tuple) -> dict:
    """Shape, two distinct colours and a box that fits inside `size`."""
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(COLOURS), 2)
    side = rng.randint(min(size) // 3, min(size) * 3 // 4)
    left, top = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
    return {"shape": shape, "colour": colour, "background": background, "box": (left, top, left + side, top + side)}


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def make_synthetic_dataset(root: str, n: int = 32, sizes=SIZES, seed: int = 0) -> str:
    """Write n captioned images under `root` (cycling through `sizes`); returns `root`."""
    os.makedirs(root, exist_ok=True)
    rng = random.Random(f"synthetic-t2i:{seed}")
    for i in range(n):
        size = tuple(sizes[i % len(sizes)])
        s = random_scene(rng, size)
        draw_scene(size, **s).save(os.path.join(root, f"{i:03d}.png"))
        with open(os.path.join(root, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"{_a(s['colour'])} {s['shape']} on {_a(s['background'])} background\n")
    return root


def make_synthetic_edit_dataset(root: str, n: int = 16, sizes=SIZES, seed: int = 0) -> tuple:
    """Write n edit pairs: root/edits (targets + instruction captions), root/references (same names).
    Returns (edits dir, references dir)."""
    edits, refs = os.path.join(root, "edits"), os.path.join(root, "references")
    os.makedirs(edits, exist_ok=True)
    os.makedirs(refs, exist_ok=True)
    rng = random.Random(f"synthetic-edit:{seed}")
    for i in range(n):
        size = tuple(sizes[i % len(sizes)])
        s = random_scene(rng, size)
        new = rng.choice([c for c in sorted(COLOURS) if c not in (s["colour"], s["background"])])
        draw_scene(size, **s).save(os.path.join(refs, f"{i:03d}.png"))
        draw_scene(size, **{**s, "colour": new}).save(os.path.join(edits, f"{i:03d}.png"))
        with open(os.path.join(edits, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(f"make the {s['shape']} {new}\n")
    return edits, refs


def moving_clip(rng: random.Random, size: tuple, num_frames: int) -> tuple:
    """(uint8 [F, H, W, 3] frames, caption): a shape crossing a plain background from edge to edge in one of
    DIRECTIONS, at constant speed."""
    w, h = size
    s = random_scene(rng, size)
    direction = rng.choice(sorted(DIRECTIONS))
    dx, dy = DIRECTIONS[direction]
    side = rng.randint(min(size) // 4, min(size) // 2)
    across = rng.randint(0, (h - side) if dx else (w - side))  # fixed position on the other axis
    frames = []
    for k in range(num_frames):
        t = k / max(1, num_frames - 1)
        t = t if dx + dy > 0 else 1 - t  # right / down: from 0 to the far edge; left / up: back
        left, top = (round(t * (w - side)), across) if dx else (across, round(t * (h - side)))
        box = (left, top, left + side - 1, top + side - 1)
        frames.append(np.asarray(draw_scene(size, s["shape"], s["colour"], s["background"], box)))
    caption = f"{_a(s['colour'])} {s['shape']} moving {direction} on {_a(s['background'])} background"
    return np.stack(frames), caption


def make_synthetic_video_dataset(root: str, n: int = 16, sizes=VIDEO_SIZES, num_frames: int = 13, fps: float = 15,
                                 seed: int = 0) -> tuple:
    """Write n captioned clips to root/clips (cycling through `sizes`) and their first frames to root/start_frames
    (same names, .png). Returns (clips dir, start frames dir)."""
    from data.video_io import write_mp4  # PyAV: only the video datasets need it
    clips, starts = os.path.join(root, "clips"), os.path.join(root, "start_frames")
    os.makedirs(clips, exist_ok=True)
    os.makedirs(starts, exist_ok=True)
    rng = random.Random(f"synthetic-video:{seed}")
    for i in range(n):
        frames, caption = moving_clip(rng, tuple(sizes[i % len(sizes)]), num_frames)
        write_mp4(os.path.join(clips, f"{i:03d}.mp4"), frames, fps=fps, lossless=True)
        Image.fromarray(frames[0]).save(os.path.join(starts, f"{i:03d}.png"))
        with open(os.path.join(clips, f"{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(caption + "\n")
    return clips, starts


def _write(path: str, entries: list) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=2)
    return path


def write_t2i_backend(path: str, data_dir: str, cache_root: str, resolution: int = 64,
                      resolution_type: str = "pixel", dataset_id: str = "synthetic") -> str:
    """One textfile-captioned image dataset."""
    return _write(path, [{
        "id": dataset_id, "type": "local", "instance_data_dir": os.path.abspath(data_dir),
        "caption_strategy": "textfile", "resolution": resolution, "resolution_type": resolution_type,
        "cache_dir_vae": os.path.abspath(os.path.join(cache_root, "vae", dataset_id)),
    }])


def write_edit_backend(path: str, edits_dir: str, refs_dir: str, cache_root: str, resolution: int = 64,
                       resolution_type: str = "pixel") -> str:
    """The LongCat-Image-Edit quickstart layout: edit images linked to a reference dataset by conditioning_data."""
    common = {"type": "local", "resolution": resolution, "resolution_type": resolution_type}
    return _write(path, [
        {"id": "edit-images", **common, "instance_data_dir": os.path.abspath(edits_dir),
         "caption_strategy": "textfile", "conditioning_data": ["ref-images"],
         "cache_dir_vae": os.path.abspath(os.path.join(cache_root, "vae", "edit"))},
        {"id": "ref-images", **common, "dataset_type": "conditioning", "instance_data_dir": os.path.abspath(refs_dir),
         "caption_strategy": None, "cache_dir_vae": os.path.abspath(os.path.join(cache_root, "vae", "ref"))},
    ])


def write_i2v_backend(path: str, clips_dir: str, starts_dir: str, cache_root: str, resolution: int = 64,
                      num_frames: int = 13, resolution_type: str = "pixel") -> str:
    """The LongCat-Video I2V quickstart layout: a video dataset (is_i2v) linked to its start frames by
    conditioning_data. (The quickstart's resolution 480 is pixel_area; tiny clips need pixel, see the docstring.)"""
    common = {"type": "local", "resolution": resolution, "resolution_type": resolution_type}
    return _write(path, [
        {"id": "longcat-video-train", **common, "dataset_type": "video", "is_i2v": True,
         "instance_data_dir": os.path.abspath(clips_dir), "caption_strategy": "textfile",
         "cache_dir_vae": os.path.abspath(os.path.join(cache_root, "vae", "video")),
         "conditioning_data": ["longcat-video-cond"], "video": {"num_frames": num_frames}},
        {"id": "longcat-video-cond", **common, "dataset_type": "conditioning",
         "instance_data_dir": os.path.abspath(starts_dir), "caption_strategy": None,
         "cache_dir_vae": os.path.abspath(os.path.join(cache_root, "vae", "video-cond"))},
    ])


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description="write a tiny synthetic dataset and its multidatabackend.json")
    p.add_argument("out")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--edit", action="store_true", help="edit pairs (edits/ + references/) instead of T2I images")
    kind.add_argument("--video", action="store_true", help="I2V clips (clips/ + start_frames/) instead of images")
    p.add_argument("--n", type=int, default=None, help="number of images (pairs, clips); default 32 (16 for "
                   "--edit and --video)")
    p.add_argument("--frames", type=int, default=13, help="frames per clip (4k+1) for --video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args(argv)
    backend, cache = os.path.join(args.out, "multidatabackend.json"), os.path.join(args.out, "cache")
    if args.video:
        clips, starts = make_synthetic_video_dataset(args.out, n=args.n or 16, num_frames=args.frames, seed=args.seed)
        write_i2v_backend(backend, clips, starts, cache, resolution=args.resolution, num_frames=args.frames)
    elif args.edit:
        edits, refs = make_synthetic_edit_dataset(args.out, n=args.n or 16, seed=args.seed)
        write_edit_backend(backend, edits, refs, cache, resolution=args.resolution)
    else:
        images = make_synthetic_dataset(os.path.join(args.out, "images"), n=args.n or 32, seed=args.seed)
        write_t2i_backend(backend, images, cache, resolution=args.resolution)
    print(f"wrote {backend}")
    return backend


if __name__ == "__main__":
    main()
