"""
Block swap on CPU: peak memory and step time of one LoRA training step with none, half or all of a ~1B-parameter
LongCat DiT's blocks swapped to the disk store (model/block_swap.py), each variant alone in a fresh child process.

    python bench/bench_block_swap.py                                   # video-1b and image-1b, none / half / all (disk)
    python bench/bench_block_swap.py --models video-1b --variants none half-disk half-cpu --skip-time

Models (bf16 weights materialised from the meta device with random values, LoRA fp32 on the official targets, AdamW,
gradient checkpointing on, as block swap is used):
  - video-1b: LongCatVideoDiT, 14 blocks of hidden 2048 (16 heads x 128, SwiGLU 5632), the real text width 4096,
    1.04B parameters; batch 1 x 2 latent frames of 16 x 16 (128 tokens) + 32 text tokens; LoRA rank 16.
  - image-1b: bench_quant.py's "1b" preset (imported): LongCatImageDiT, 4 double + 12 single blocks, 1792 wide,
    1.04B parameters; its batch and its LoRA step (rank 32). The blocks differ in size: a double block has 36 D^2
    weights, a single one 15 D^2, so its last half (8 single blocks) holds 37% of the block weights, not 50%.
Variants: none; half-disk / all-disk: the last K // 2 or all K blocks in the disk store (a file in a temporary
folder, read back with plain reads: page cache, not process memory); half-cpu: host to host (costs memory on CPU).

(a) Memory, per variant above the RSS before the build (MALLOC_MMAP_THRESHOLD_ set so frees return to the OS):
"train peak" = the peak RSS over 2 training steps after set-up (resident weights, the 2 resident block buffers, LoRA
+ AdamW state, activations), the number block swap is about; "set-up peak" = the peak while building the model,
before the swap takes the blocks out (this bench, like the loaders, materialises the whole DiT first); the faster
time of those 2 steps after a warm-up step, and the ratios vs no swap.
(b) Step time on --time-models (small configs: 1B steps take tens of seconds on 2 cores), all variants built in one
process and timed interleaved (measure.interleaved_times), median of --steps: the CPU cost of the copies (memcpy
from the page cache) per step; a GPU's cost is the H2D traffic, hidden by the side-stream prefetch when it fits.
"""
import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from measure import PeakRSS, interleaved_times, release_frees_to_os, rss_bytes  # noqa: E402  (bench/ = this folder)

release_frees_to_os()  # before torch is imported: big frees must return memory for a per-variant RSS peak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_quant  # noqa: E402  (the image "1b" preset, its build, batch and LoRA step)
from model.block_swap import BlockSwap, execution_order  # noqa: E402
from model.dit_video import LongCatVideoDiT, VideoDiTConfig  # noqa: E402
from model.lora import LONGCAT_VIDEO_LORA_TARGETS, apply_lora  # noqa: E402

VIDEO = {"video-1b": dict(hidden_size=2048, depth=14, num_heads=16), "video-small": dict(hidden_size=256, depth=4,
                                                                                          num_heads=4)}
VARIANTS = ["none", "half-disk", "all-disk"]
DTYPE = torch.bfloat16


@torch.no_grad()
def build_video(name, seed=0):
    with torch.device("meta"):
        dit = LongCatVideoDiT(VideoDiTConfig(**VIDEO[name]))
    dit = dit.to_empty(device="cpu").to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    for pname, t in [*dit.named_parameters(), *dit.named_buffers()]:
        if t.dim() > 1:
            t.copy_(torch.randn(t.shape, generator=g).mul_(0.02))
        else:  # norm scales 1, biases 0
            t.fill_(1.0 if pname.endswith("weight") else 0.0)
    return dit


def video_step_fn(dit, rank=16):
    apply_lora(dit, LONGCAT_VIDEO_LORA_TARGETS, rank=rank, alpha=rank)
    dit.train()
    opt = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-4)

    def step(b):
        pred = dit(b["x_t"], b["t"], b["text"])
        loss = F.mse_loss(pred.float(), b["target"].float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def video_batch(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = VideoDiTConfig(**VIDEO[name])
    return dict(x_t=torch.randn(1, 16, 2, 16, 16, generator=g).to(DTYPE), t=torch.tensor([500.0]),
                text=torch.randn(1, 32, cfg.caption_channels, generator=g).to(DTYPE),
                target=torch.randn(1, 16, 2, 16, 16, generator=g))


def setup(model):
    """(dit, step, batch) for a model name; the image ones come from bench_quant."""
    if model.startswith("video"):
        dit = build_video(model)
        return dit, video_step_fn(dit), video_batch(model)
    preset = model.split("-")[1]
    dit = bench_quant.build(preset, "bf16")
    return dit, bench_quant.lora_step_fn(dit), bench_quant.make_batch(preset)


def prepared(model, variant, folder):
    """(step, batch, blocks, parameters) of `model` with `variant`'s block swap, gradient checkpointing on."""
    torch.manual_seed(0)  # the same LoRA init for every variant, in a child process or side by side
    dit, step, batch = setup(model)
    dit.gradient_checkpointing = True
    K, params = len(execution_order(dit)), sum(p.numel() for p in dit.parameters())
    if variant != "none":
        n = K if variant.startswith("all") else K // 2
        BlockSwap(dit, n, "cpu", store=variant.split("-")[1], path=os.path.join(folder, f"{model}-{variant}.bin"))
    return step, batch, K, params


def child(model, variant):
    folder = tempfile.mkdtemp(prefix="bench_block_swap_")
    small = "video-small" if model.startswith("video") else "image-small"
    warm, batch, _, _ = prepared(small, variant, folder)
    warm(batch)  # first use of every op pages in code and thread pools: not part of the baseline
    del warm, batch
    gc.collect()
    base = rss_bytes()
    with PeakRSS() as built:
        step, batch, K, params = prepared(model, variant, folder)
        gc.collect()
    step(batch)  # warm-up
    gc.collect()
    times = []
    with PeakRSS() as train:
        for _ in range(2):
            t0 = time.perf_counter()
            loss = step(batch)
            times.append(time.perf_counter() - t0)
    shutil.rmtree(folder)
    return dict(model=model, variant=variant, blocks=K, params=params, setup_peak=built.peak - base,
                train_peak=train.peak - base, step_s=min(times), loss=loss)


def step_times(model, variants, steps):
    """Median step time of each variant, all built in this process and timed interleaved (measure.py)."""
    folder = tempfile.mkdtemp(prefix="bench_block_swap_")
    fns = {}
    for v in variants:
        fns[v], batch, _, _ = prepared(model, v, folder)
    times, losses = interleaved_times(fns, batch, warmup=1, n=steps)
    shutil.rmtree(folder)
    return {v: sorted(t)[len(t) // 2] for v, t in times.items()}, losses


def run_child(model, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, variant]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return dict(model=model, variant=variant, error=(out.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(out.stdout.split("RESULT ")[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["video-1b", "image-1b"])
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--time-models", nargs="+", default=["video-small", "image-small"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.child:
        print("RESULT " + json.dumps(child(*args.child)))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    mib = 2 ** 20
    if not args.skip_mem:
        print("(a) memory: each variant alone in a child process; the step time of 2 steps (noisy when loaded)")
        print("| model | variant | blocks swapped | set-up peak MiB | train peak MiB | train peak vs none | step s | "
              "step vs none | loss |")
        print("|---|---|---|---|---|---|---|---|---|")
    for model in [] if args.skip_mem else args.models:
        res = [run_child(model, v) for v in args.variants]
        ref = next((r for r in res if r["variant"] == "none" and "error" not in r), None)
        for r in res:
            if "error" in r:
                print(f"| {model} | {r['variant']} | failed: {r['error']} |")
                continue
            K = r["blocks"]
            n = 0 if r["variant"] == "none" else K if r["variant"].startswith("all") else K // 2
            mem = r["train_peak"] / ref["train_peak"] if ref else float("nan")
            dt = r["step_s"] / ref["step_s"] if ref else float("nan")
            print(f"| {model} ({r['params'] / 1e9:.2f}B with LoRA) | {r['variant']} | {n} of {K} | {r['setup_peak'] / mib:.0f} | "
                  f"{r['train_peak'] / mib:.0f} | {mem:.3f} | {r['step_s']:.2f} | {dt:.2f}x | {r['loss']:.4f} |")

    if args.skip_time:
        return
    print(f"(b) step time, interleaved in one process, median of {args.steps} steps after 1 warm-up round")
    print("| model | variant | step ms | vs none | loss |")
    print("|---|---|---|---|---|")
    for model in args.time_models:
        t, losses = step_times(model, args.variants, args.steps)
        for v, s in t.items():
            print(f"| {model} | {v} | {s * 1000:.0f} | {s / t.get('none', s):.2f}x | {losses[v]:.4f} |")


if __name__ == "__main__":
    main()
