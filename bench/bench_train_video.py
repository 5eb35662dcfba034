"""
One LongCat-Video LoRA training step on CPU: what gradient checkpointing costs in time and saves in memory, I2V vs
T2V, and (where the latent grid allows it) block-sparse self-attention, all in the same process.

    python bench/bench_train_video.py                 # small config (default)
    python bench/bench_train_video.py --preset tiny
    python bench/bench_train_video.py --preset small --dtype bf16

Step = `train_video.training_loss` (the official objective: the first num_cond latent frames clean with timestep 0,
target x0 - eps, MSE over the noise frames) + backward + grad clip + AdamW step, LoRA on the official 7 target
modules (`LONGCAT_VIDEO_LORA_TARGETS`). Variants, all from the same weights and batch:
  1. I2V LoRA (num_cond = 1), gradient checkpointing   <- the training default, the baseline of every ratio
  2. I2V LoRA, no checkpointing
  3. T2V LoRA (num_cond = 0), gradient checkpointing
  4. T2V LoRA, gradient checkpointing, BSA (sparsity 0.75, chunk (4, 4, 4)): only when the token grid
     (T, H/2, W/2) is divisible by the chunk; T2V because with one cond frame (not a multiple of the temporal
     chunk) the DiT falls back to dense attention for every query, as its BSA note says.
Step time: every variant built in this process, their --steps steps interleaved after --warmup (order alternating),
each ratio taken step by step against variant 1 and its median reported (robust to the drift of a shared 2-core
machine). Peak memory: each variant alone in a fresh child process (CPU has no per-tensor allocator statistics, and
RSS is shared by everything in a process): the peak resident set size, sampled every millisecond: "total" over
building the variant + 2 steps minus the RSS before the build (frozen weights, LoRA, optimizer state, activations,
one-time buffers), "one step" over a third step minus the RSS just before it (activations and their gradients on top
of the steady state). MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS at once.
"""
import argparse
import os
import subprocess
import sys

from measure import interleaved_times, release_frees_to_os, step_memory  # noqa: E402  (bench/ is this script's folder)

release_frees_to_os()  # before torch is imported: big frees must return memory for a per-variant RSS peak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

from model.dit_video import LongCatVideoDiT, VideoDiTConfig  # noqa: E402
from model.lora import LONGCAT_VIDEO_LORA_TARGETS, apply_lora  # noqa: E402
from model.tiny_checkpoint import TINY_VIDEO_DIT  # noqa: E402
from train_video import training_loss  # noqa: E402

DTYPE = torch.float32
BSA = {"sparsity": 0.75, "chunk_3d_shape_q": [4, 4, 4], "chunk_3d_shape_k": [4, 4, 4]}
PRESETS = {  # dit: VideoDiTConfig fields; latent: (T, H, W) of the 16-channel latent; text: umT5 tokens
    "tiny": dict(dit=TINY_VIDEO_DIT, latent=(4, 8, 8), text=512, caption_tokens=64),  # 13 frames at 64x64
    "small": dict(dit=dict(in_channels=16, out_channels=16, hidden_size=512, depth=4, num_heads=8,
                           caption_channels=512, mlp_ratio=4, adaln_tembed_dim=128, frequency_embedding_size=256,
                           patch_size=[1, 2, 2]),
                  latent=(8, 32, 32), text=512, caption_tokens=64),  # 29 frames at 256x256 -> 2048 video tokens
}
# name -> (num_cond, gradient checkpointing, BSA); the first one is the baseline of the ratios
VARIANTS = {
    "I2V LoRA, checkpointing": (1, True, False),
    "I2V LoRA, no checkpointing": (1, False, False),
    "T2V LoRA, checkpointing": (0, True, False),
    "T2V LoRA, checkpointing, BSA 0.75": (0, True, True),
}


def base_weights(cfg):
    """The DiT's state dict, seeded; the release's init zeroes the output layers (and so every LoRA gradient):
    fill those like model/tiny_checkpoint.py does, so the step does real work."""
    torch.manual_seed(0)
    dit = LongCatVideoDiT(cfg)
    with torch.no_grad():
        for p in dit.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return {k: v.clone() for k, v in dit.state_dict().items()}


def make_batch(p, B, caption_channels, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, H, W = p["latent"]
    mask = torch.zeros(B, p["text"], dtype=torch.long)
    mask[:, :p["caption_tokens"]] = 1  # a short caption, zero-padded to 512 tokens (all attended: zero-pad mode)
    return dict(x0=torch.randn(B, 16, T, H, W, generator=g).to(dtype),
                noise=torch.randn(B, 16, T, H, W, generator=g).to(dtype),
                sigma=torch.rand(B, generator=g), mask=mask,
                embeds=torch.randn(B, p["text"], caption_channels, generator=g).to(dtype))


def build_step(state_dict, cfg, rank, variant):
    num_cond, ckpt, bsa = VARIANTS[variant]
    dit = LongCatVideoDiT(cfg).to(DTYPE)
    dit.load_state_dict(state_dict)
    apply_lora(dit, LONGCAT_VIDEO_LORA_TARGETS, rank=rank, alpha=rank)  # LoRA weights fp32 whatever the base dtype
    dit.gradient_checkpointing = ckpt
    dit.set_bsa(bsa, BSA if bsa else None)
    dit.train()
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        loss = training_loss(dit, b["x0"], b["noise"], b["sigma"], b["embeds"], b["mask"], num_cond)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, (dit, opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 40 tiny, 6 small)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="base weights and activations (bf16 = the GPU training setup; LoRA weights stay fp32)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DTYPE
    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    steps = args.steps or {"tiny": 40, "small": 6}[args.preset]
    p = PRESETS[args.preset]
    cfg = VideoDiTConfig(**p["dit"])
    state_dict = base_weights(cfg)
    batch = make_batch(p, args.batch, cfg.caption_channels, DTYPE)
    T, H, W = p["latent"]
    grid = (T, H // cfg.patch_size[1], W // cfg.patch_size[2])
    names = list(VARIANTS)
    if args.child:  # memory of one variant, alone in this process
        print("PEAK %d %d" % step_memory(lambda: build_step(state_dict, cfg, args.rank, args.child), batch))
        return
    n_params = sum(v.numel() for v in state_dict.values())
    print(f"preset {args.preset}: hidden {cfg.hidden_size}, depth {cfg.depth}, {cfg.num_heads} heads, "
          f"{n_params / 1e6:.2f}M params; latent 16 x {T} x {H} x {W} ({4 * (T - 1) + 1} frames at "
          f"{8 * H}x{8 * W}) -> {grid[0] * grid[1] * grid[2]} video tokens, grid {grid}; {p['text']} text tokens x "
          f"{cfg.caption_channels}; batch {args.batch}, LoRA rank {args.rank}, {args.dtype}, "
          f"threads {torch.get_num_threads()}")
    print(f"load average at the start (1, 5, 15 min): {' '.join(open('/proc/loadavg').read().split()[:3])}")
    if any(g % c for g, c in zip(grid, BSA["chunk_3d_shape_q"])):
        print(f"note: BSA variant skipped: grid {grid} is not divisible by chunk {tuple(BSA['chunk_3d_shape_q'])}")
        names = names[:-1]
    built = {name: build_step(state_dict, cfg, args.rank, name) for name in names}
    times, losses = interleaved_times({n: b[0] for n, b in built.items()}, batch, args.warmup, steps)
    for name in names:
        t = sorted(times[name])
        print(f"{name:34s} step median {t[len(t) // 2] * 1000:8.1f} ms, fastest {t[0] * 1000:8.1f} ms "
              f"({steps} steps)   loss {losses[name]:.6f}")
    mem = {}
    for name in names:  # each variant in a fresh process: CPU RSS is shared by everything in a process
        out = subprocess.run([sys.executable, *sys.argv, "--child", name], capture_output=True, text=True, check=True)
        mem[name] = [int(v) for v in out.stdout.split("PEAK ")[-1].split()[:2]]
        print(f"{name:34s} peak memory: total +{mem[name][0] / 2**20:.1f} MiB, one step +{mem[name][1] / 2**20:.1f} MiB")
    base = names[0]
    print(f"ratios vs {base!r} (time: median of per-step pairs, range):")
    for name in names[1:]:
        pair = sorted(a / b for a, b in zip(times[name], times[base]))  # step i of this vs step i of the baseline
        print(f"  {name:34s} step time {pair[len(pair) // 2]:.3f} ({pair[0]:.3f}-{pair[-1]:.3f}), peak memory "
              f"total {mem[name][0] / mem[base][0]:.3f}, one step {mem[name][1] / mem[base][1]:.3f}")
    if len(names) == 4:  # BSA against its dense twin
        (dense, sparse) = names[2:]
        pair = sorted(a / b for a, b in zip(times[sparse], times[dense]))
        print(f"ratio {sparse!r} / {dense!r}: step time {pair[len(pair) // 2]:.3f} ({pair[0]:.3f}-{pair[-1]:.3f}), "
              f"peak memory total {mem[sparse][0] / mem[dense][0]:.3f}, one step {mem[sparse][1] / mem[dense][1]:.3f}")
    print(f"load average at the end (1, 5, 15 min): {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
