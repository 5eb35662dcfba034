"""
--estimate_memory against the measured peak: each case trains a few steps in a child process (train_image.py /
train_video.py on synthetic data, CPU, default malloc: what a user's process shows) and reads its peak RSS from
the kernel (memory_estimate.measured_peak_rss); the estimate is memory_estimate.estimate() of the same config.

    python bench/bench_memory_estimate.py                 # tiny image, tiny video, ~1B LongCat-Image (LoRA and int8)
    python bench/bench_memory_estimate.py --cases tiny    # only the tiny ones
    python bench/bench_memory_estimate.py --real          # the CUDA table of the real configs for bench/RESULTS.md

The ~1B model is bench/bench_quant.py's "1b" preset (LongCat-Image at D = 1792, 4 + 12 blocks, 1.06B parameters),
written once with random fp32 weights to runs/bench-memory/ (4.2 GB; the text stack is the tiny Qwen at width 3584).
--real reads bench/real_configs/ (config.json files only, written from the specs' numbers: see its README).
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from memory_estimate import GB, estimate, format_estimate, measured_peak_rss  # noqa: E402

WORK = REPO / "runs" / "bench-memory"
COMMON = dict(model_type="lora", train_batch_size=2, max_train_steps=3, learning_rate=1e-4, lora_rank=16,
              lora_dropout=0.0, optimizer="adamw", mixed_precision="no", gradient_checkpointing=True,
              checkpoint_step_interval=0, validation_disable=True, resume_from_checkpoint="")


def prepare(names) -> dict:
    """Model folders and synthetic data under runs/bench-memory/ (written once); returns their paths."""
    from data.synthetic import make_synthetic_dataset, make_synthetic_video_dataset
    from model.tiny_checkpoint import write_tiny_longcat_image, write_tiny_longcat_video
    paths = dict(images=WORK / "images", video=WORK / "video", tiny=WORK / "tiny", tinyv=WORK / "tinyv",
                 big=WORK / "1b")
    if not paths["images"].exists():
        make_synthetic_dataset(str(paths["images"]), n=8, sizes=[(512, 512)], seed=0)
    if not (paths["tiny"] / "model_index.json").exists():
        write_tiny_longcat_image(paths["tiny"])
    if any(n.startswith("1b") for n in names) and not (paths["big"] / "model_index.json").exists():
        sys.path.insert(0, str(REPO / "bench"))
        from bench_quant import config  # the "1b" preset (importing it re-execs this script once: harmless here)
        write_tiny_longcat_image(paths["big"], dit_cfg=config("1b"))
    if any(n.startswith("video") for n in names):
        if not (paths["tinyv"] / "dit").exists():
            write_tiny_longcat_video(paths["tinyv"])
        if not paths["video"].exists():
            make_synthetic_video_dataset(str(paths["video"]), n=4, sizes=[(256, 256)], num_frames=13, seed=0)
    return paths


CASES = {  # name -> (script, model, resolution, options)
    "tiny": ("train_image.py", "tiny", 64, {}),
    "tiny-512": ("train_image.py", "tiny", 512, {}),
    "video": ("train_video.py", "tinyv", 256, {}),
    "1b": ("train_image.py", "big", 256, {}),
    "1b-int8": ("train_image.py", "big", 256, dict(base_model_precision="int8-quanto")),
    "1b-nockpt": ("train_image.py", "big", 256, dict(gradient_checkpointing=False)),
}


def case_options(name: str, paths: dict, out: Path) -> tuple:
    """(script, options) of one case, with a fresh output folder and latent cache (so the VAE encode is measured)."""
    from data.synthetic import write_i2v_backend, write_t2i_backend
    script, model, res, options = CASES[name]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if script == "train_video.py":
        backend = write_i2v_backend(str(out / "backend.json"), str(paths["video"] / "clips"),
                                    str(paths["video"] / "start_frames"), str(out / "cache"), resolution=res,
                                    num_frames=13, resolution_type="pixel_area")
    else:
        backend = write_t2i_backend(str(out / "backend.json"), str(paths["images"]), str(out / "cache"),
                                    resolution=res, resolution_type="pixel_area")
    return script, dict(options, pretrained_model_name_or_path=str(paths[model]), data_backend_config=backend)


def argv(options: dict, out: Path) -> list:
    return [f"--{k}={v}" for k, v in {**COMMON, **options, "output_dir": str(out)}.items()]


def measure(script: str, args: list) -> tuple:
    """(peak RSS bytes, seconds) of one training run in a child process."""
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # set by bench_quant's import
    status, peak, err = measured_peak_rss([sys.executable, str(REPO / script), *args], cwd=REPO, env=env)
    if status:
        raise RuntimeError(f"{script} failed: {err.strip().splitlines()[-1:] or status}")
    return peak, time.time() - t0


def estimate_for(script: str, args: list, device="cpu", world_size=1, check=True):
    """estimate() of the config a training script would build from `args`; check=False skips its start-up checks
    (the real-config table asks for block swap, which this version's trainer may still refuse)."""
    from config import load_config
    from trainer import ALIASES
    if script == "train_image.py":
        from train_image import TrainImageConfig as cls, check_config
        family = "longcat_image"
    else:
        from train_video import TrainVideoConfig as cls, check_config
        family = "longcat_video"
    cfg = load_config(cls, args, aliases=ALIASES, quiet=True)
    if check:
        check_config(cfg)
    return estimate(cfg, family, device, world_size)


def compare(names: list):
    paths = prepare(names)
    print("| case | estimate | measured peak RSS | estimate / measured | run |")
    print("|---|---|---|---|---|")
    for name in names:
        out = WORK / "out" / name
        script, options = case_options(name, paths, out)
        args = argv(options, out / "run")
        est = estimate_for(script, args)
        peak, secs = measure(script, args)
        print(f"| {name} | {est.peak / GB:.2f} GB | {peak / GB:.2f} GB | {est.peak / peak:.2f} | {secs:.0f} s |",
              flush=True)
        if os.environ.get("VERBOSE"):
            print(format_estimate(est))


# -----------------------------------------------------------------------------
# the real configs (CUDA), for bench/RESULTS.md

REAL = REPO / "bench" / "real_configs"


def real_table():
    """Markdown rows: the real configs on one CUDA GPU, LoRA, bf16 autocast, batch 1, gradient checkpointing. With
    an 8-bit base the text encoder is quantized the same way (text_encoder_1_precision), as a user short of memory
    would."""
    rows = ["| model | bucket | rank | base (+ text encoder) | blocks swapped | DiT weights | grads + AdamW | "
            "activations | training phase | caching phase | expected peak |", "|---" * 11 + "|"]
    for family, script, folder, backend, n, align in (  # 480 = 15 x 32: alignment 64 would round it to 512
            ("LongCat-Image", "train_image.py", "longcat-image", "image_1024.json", 30, 64),
            ("LongCat-Video", "train_video.py", "longcat-video", "video_480p_93.json", 48, 32)):
        for rank in (16, 32):
            for precision in ("bf16", "int8-quanto", "fp8-torchao"):
                for swap in (0, n // 2, n * 3 // 4):
                    opts = dict(COMMON, train_batch_size=1, lora_rank=rank, base_model_precision=precision,
                                text_encoder_1_precision="no_change" if precision == "bf16" else precision,
                                musubi_blocks_to_swap=swap, mixed_precision="bf16", aspect_bucket_alignment=align,
                                pretrained_model_name_or_path=str(REAL / folder),
                                data_backend_config=str(REAL / backend), output_dir="/tmp/unused")
                    est = estimate_for(script, [f"--{k}={v}" for k, v in opts.items()], device="cuda",
                                       check=False)
                    t = est.training
                    weights = t["DiT frozen weights"] + t["trainable weights (fp32 master)"]
                    state = t["gradients (fp32)"] + t["optimizer states"]
                    act = t["activations saved for backward"] + t["one block's recompute + backward"]
                    rows.append(f"| {family} | {est.inputs['bucket']} | {rank} | {precision} | {swap} | "
                                f"{weights / GB:.1f} | {state / GB:.2f} | {act / GB:.1f} | "
                                f"{sum(t.values()) / GB:.1f} | {sum(est.caching.values()) / GB:.1f} | "
                                f"**{est.peak / GB:.1f} GB** |")
    print("\n".join(rows))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--real", action="store_true", help="print the CUDA estimates of the real configs")
    a = ap.parse_args()
    real_table() if a.real else compare(a.cases)
