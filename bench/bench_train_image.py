"""
One LoRA training step of LongCat-Image: ours vs a reference step written with diffusers' LongCat transformer + PEFT
LoRA (what SimpleTuner runs), same config, same weights, same batch, same process, CPU.

    python bench/bench_train_image.py                 # small config (default)
    python bench/bench_train_image.py --preset tiny

Step = forward + MSE(eps - x0) + backward + grad clip + AdamW step, with gradient checkpointing on both sides
(the training default). Step time: both variants
built in this process, their --steps steps interleaved after --warmup (order alternating), the ratio taken step by
step and its median reported (robust to the drift of a shared 2-core machine). Peak memory: each variant alone in a fresh child process (CPU has no
per-tensor allocator statistics, and RSS is shared by everything in a process): the peak resident set size, sampled
every millisecond: "total" over building the variant + 2 steps minus the RSS before the build (frozen weights, LoRA,
optimizer state, activations, one-time buffers), "one step" over a third step minus the RSS just before it
(activations and their gradients on top of the steady state). MALLOC_MMAP_THRESHOLD_ is set so freed tensors go back to the OS at once.
Prints the ratios ours / reference.
"""
import argparse
import os
import subprocess
import sys

from measure import interleaved_times, release_frees_to_os, step_memory  # noqa: E402  (bench/ is this script's folder)

release_frees_to_os()  # before torch is imported: big frees must return memory for a per-variant RSS peak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import LongCatImageTransformer2DModel  # noqa: E402  (imported before any measurement)
from peft import LoraConfig  # noqa: E402

from model.dit_image import ImageDiTConfig, LongCatImageDiT, image_position_ids, text_position_ids  # noqa: E402
from model.lora import LONGCAT_IMAGE_LORA_TARGETS, apply_lora  # noqa: E402
from train_image import training_loss  # noqa: E402

DTYPE = torch.float32
PRESETS = {
    "tiny": dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=64, axes_dims_rope=[4, 6, 6], text=512, grid=8),
    "medium": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                   joint_attention_dim=512, axes_dims_rope=[8, 28, 28], text=512, grid=48),
    "small": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                  joint_attention_dim=512, axes_dims_rope=[8, 28, 28], text=512, grid=32),
}


def make_batch(p, B, dim_text, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = p["grid"] ** 2
    return dict(x0=torch.randn(B, N, 64, generator=g).to(dtype), noise=torch.randn(B, N, 64, generator=g).to(dtype),
                sigma=torch.rand(B, generator=g).to(dtype),
                embeds=torch.randn(B, p["text"], dim_text, generator=g).to(dtype),
                img_ids=image_position_ids(p["grid"], p["grid"], p["text"]), txt_ids=text_position_ids(p["text"]))


def ours_step_fn(state_dict, cfg, rank):
    dit = LongCatImageDiT(cfg).to(DTYPE)
    dit.load_state_dict(state_dict)
    apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=rank, alpha=rank)
    dit.gradient_checkpointing = True
    dit.train()
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        loss = training_loss(dit, b["x0"], b["noise"], b["sigma"], b["embeds"], b["img_ids"], b["txt_ids"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, (dit, opt)


def reference_step_fn(state_dict, cfg, rank):
    ref = LongCatImageTransformer2DModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    ref.to(DTYPE).load_state_dict(state_dict)
    ref.requires_grad_(False)
    ref.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LONGCAT_IMAGE_LORA_TARGETS,
                               init_lora_weights=True))
    ref.enable_gradient_checkpointing()
    ref.train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        s = b["sigma"][:, None, None]
        x_t = (1 - s) * b["x0"] + s * b["noise"]
        pred = ref(hidden_states=x_t, encoder_hidden_states=b["embeds"], timestep=b["sigma"], img_ids=b["img_ids"],
                   txt_ids=b["txt_ids"], return_dict=False)[0]
        loss = F.mse_loss(pred.float(), (b["noise"] - b["x0"]).float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, (ref, opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="base weights and activations (bf16 = the GPU training setup; LoRA weights stay fp32)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DTYPE
    DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    p = PRESETS[args.preset]
    cfg = ImageDiTConfig(in_channels=64, pooled_projection_dim=p["joint_attention_dim"],
                         **{k: v for k, v in p.items() if k not in ("text", "grid")})
    torch.manual_seed(0)
    state_dict = {k: v.clone() for k, v in LongCatImageDiT(cfg).state_dict().items()}
    batch = make_batch(p, args.batch, cfg.joint_attention_dim, DTYPE)
    print(f"preset {args.preset}: D={cfg.dim}, {cfg.num_layers}+{cfg.num_single_layers} blocks, "
          f"{p['text']} text + {p['grid'] ** 2} image tokens, batch {args.batch}, LoRA rank {args.rank}, "
          f"{args.dtype}, threads {torch.get_num_threads()}")
    builders = {"reference (diffusers + PEFT)": reference_step_fn, "ours": ours_step_fn}
    if args.child:  # memory of one variant, alone in this process
        print("PEAK %d %d" % step_memory(lambda: builders[args.child](state_dict, cfg, args.rank), batch))
        return
    built = {name: build(state_dict, cfg, args.rank) for name, build in builders.items()}
    times, losses = interleaved_times({n: b[0] for n, b in built.items()}, batch, args.warmup, args.steps)
    for name in builders:
        t = sorted(times[name])
        print(f"{name:28s} step median {t[len(t) // 2] * 1000:8.1f} ms, fastest {t[0] * 1000:8.1f} ms "
              f"({args.steps} steps)   loss {losses[name]:.6f}")
    ref_name = "reference (diffusers + PEFT)"
    pair = sorted(o / r for o, r in zip(times["ours"], times[ref_name]))  # step i of ours vs step i of the reference
    mem = {}
    for name in builders:  # each variant in a fresh process: CPU RSS is shared by everything in a process
        out = subprocess.run([sys.executable, *sys.argv, "--child", name], capture_output=True, text=True, check=True)
        mem[name] = [int(v) for v in out.stdout.split("PEAK ")[-1].split()[:2]]
        print(f"{name:28s} peak memory: total +{mem[name][0] / 2**20:.1f} MiB, one step +{mem[name][1] / 2**20:.1f} MiB")
    (m_ref, s_ref), (m_ours, s_ours) = mem[ref_name], mem["ours"]
    print(f"ratio ours/reference: step time {pair[len(pair) // 2]:.3f} (median of per-step pairs; range "
          f"{pair[0]:.3f}-{pair[-1]:.3f}), peak memory total {m_ours / m_ref:.3f}, one step {s_ours / s_ref:.3f}")


if __name__ == "__main__":
    main()
