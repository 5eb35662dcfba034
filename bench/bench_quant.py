"""
Quantized frozen base for LoRA: weight bytes, peak memory and step time per base precision, and (on a GPU) the
Triton weight-only kernels against bf16 F.linear.

    python bench/bench_quant.py                          # 1B memory + small-config step time + GPU kernels if any
    python bench/bench_quant.py --mem-preset small       # everything on the small config (quick)
    python bench/bench_quant.py --precisions bf16 int8-ours int8-ours+mod   # "+mod": quantize_modulation (AdaLN too)

(a) Memory, on a ~1B-parameter LongCat-Image DiT (LongCatImageDiT, 4 double + 12 single blocks, 14 heads x 128 =
    1792 wide, the real text width 3584): each precision alone in a fresh child process. The model is built on the
    meta device, materialised in bf16 (no fp32 copy), quantized with quant.convert.quantize_model (the default keeps
    the per-block AdaLN, embedders and the final layer in bf16; "+mod" variants quantize the AdaLN too, as LongCat's
    own int8 and the trainer's quantize_modulation option do), LoRA applied on the official targets
    (LONGCAT_IMAGE_LORA_TARGETS, rank 32, alpha 8, fp32 adapters). Reported: transformer weight bytes (parameters +
    buffers + bnb quant states) and the ratio vs bf16, over the whole transformer and over the quantized layers only;
    "resident" = RSS after build + quantize + LoRA minus the RSS before the build; "step peak" = the peak RSS
    (sampled every ms, as in bench_train_image.py) over 2 LoRA training steps (forward + MSE + backward + AdamW on
    the LoRA parameters, bf16 activations, no gradient checkpointing) minus the same baseline, i.e. weights +
    activations + LoRA state + transients (the dequantized copy of one layer). MALLOC_MMAP_THRESHOLD_ is set so
    freed tensors go back to the OS.
(b) CPU step time of the same LoRA step per precision (median of --steps after --warmup), on --time-preset (small by
    default: the 1B step takes tens of seconds per precision on 2 cores), ratio vs the bf16 base.
(c) GPU only: our Triton kernels (int8 / fp8, per channel) vs bf16 F.linear at the spec's shapes (kernels.md §11),
    forward and forward + dgrad, triton.testing.do_bench; else prints "skipped: no CUDA device".
"""
import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import time

from measure import PeakRSS, release_frees_to_os, rss_bytes  # noqa: E402  (bench/ is this script's folder)

release_frees_to_os()  # before torch is imported: big frees must return memory for a per-variant RSS peak

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from model.dit_image import ImageDiTConfig, LongCatImageDiT, image_position_ids, text_position_ids  # noqa: E402
from model.lora import LONGCAT_IMAGE_LORA_TARGETS, apply_lora  # noqa: E402
from quant.convert import dit_skip, quantizable, quantize_model  # noqa: E402
from quant.linear import QuantLinear  # noqa: E402

PRESETS = {  # text / grid: tokens of the training batch (grid x grid image tokens)
    "1b": dict(num_layers=4, num_single_layers=12, attention_head_dim=128, num_attention_heads=14,
               joint_attention_dim=3584, axes_dims_rope=[16, 56, 56], text=32, grid=8),
    "small": dict(num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=6,
                  joint_attention_dim=512, axes_dims_rope=[8, 28, 28], text=64, grid=16),
}
PRECISIONS = ["bf16", "int8-ours", "fp8-ours", "int8-ours+mod", "fp8-ours+mod", "nf4-bnb"]
DTYPE = torch.bfloat16


def config(preset):
    p = PRESETS[preset]
    return ImageDiTConfig(pooled_projection_dim=p["joint_attention_dim"],
                          **{k: v for k, v in p.items() if k not in ("text", "grid")})


@torch.no_grad()
def build(preset, precision, seed=0):
    """bf16 DiT materialised from the meta device (no fp32 copy), quantized, LoRA on the official targets."""
    cfg = config(preset)
    with torch.device("meta"):
        dit = LongCatImageDiT(cfg)
    dit = dit.to_empty(device="cpu").to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    for name, t in [*dit.named_parameters(), *dit.named_buffers()]:
        if t.is_floating_point():  # random weights: the memory and speed do not depend on the values
            if t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g).mul_(0.02))
            else:  # norm scales 1, biases 0
                t.fill_(1.0 if name.endswith("weight") else 0.0)
    dit.eval()
    base, mod = precision.removesuffix("+mod"), precision.endswith("+mod")
    quantize_model(dit, base, skip=dit_skip(mod))
    gc.collect()
    return dit


def weight_bytes(dit):
    """(whole transformer, quantized layers only) bytes: parameters + buffers (+ bnb quant-state tensors)."""
    total = quant = 0
    for m in dit.modules():
        own = sum(t.nbytes for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:  # bnb Params4bit: absmax (and nested state) live outside the parameter
            own += sum(t.nbytes for t in vars(qs).values() if torch.is_tensor(t))
        total += own
        if isinstance(m, QuantLinear) or type(m).__module__.startswith("bitsandbytes"):
            quant += own
    return total, quant


def make_batch(preset, seed=0):
    p, cfg = PRESETS[preset], config(preset)
    g = torch.Generator().manual_seed(seed)
    N, L = p["grid"] ** 2, p["text"]
    return dict(x0=torch.randn(1, N, cfg.in_channels, generator=g).to(DTYPE),
                noise=torch.randn(1, N, cfg.in_channels, generator=g).to(DTYPE),
                sigma=torch.rand(1, generator=g).to(DTYPE),
                embeds=torch.randn(1, L, cfg.joint_attention_dim, generator=g).to(DTYPE),
                img_ids=image_position_ids(p["grid"], p["grid"], L), txt_ids=text_position_ids(L))


def lora_step_fn(dit, rank=32, alpha=8):
    apply_lora(dit, LONGCAT_IMAGE_LORA_TARGETS, rank=rank, alpha=alpha)
    dit.train()
    params = [p for p in dit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        s = b["sigma"][:, None, None]
        x_t = (1 - s) * b["x0"] + s * b["noise"]
        pred = dit(x_t, b["embeds"], b["sigma"], b["img_ids"], b["txt_ids"])
        loss = F.mse_loss(pred.float(), (b["noise"] - b["x0"]).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def child_memory(preset, precision):
    if precision.endswith("-bnb"):
        importlib.import_module("bitsandbytes")  # ~430 MB of its own: imported before the baseline
    warm = lora_step_fn(build("small", "bf16" if precision.endswith("-bnb") else precision))
    warm(make_batch("small"))  # first use of every op pages in code and thread pools: not part of the baseline
    del warm
    batch = make_batch(preset)
    gc.collect()
    base = rss_bytes()
    dit = build(preset, precision)
    total, quant = weight_bytes(dit)
    step = lora_step_fn(dit)
    gc.collect()
    resident = rss_bytes() - base
    with PeakRSS() as peak:
        for _ in range(2):
            loss = step(batch)
    return dict(precision=precision, weight_bytes=total, quant_bytes=quant, resident=resident,
                step_peak=peak.peak - base, loss=loss)


def run_child(args, preset, precision):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", precision, "--mem-preset", preset]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return dict(precision=precision, error=(out.stderr.strip().splitlines() or ["?"])[-1][:200])
    return json.loads(out.stdout.split("RESULT ")[-1])


def bf16_layer_bytes(preset, mod=False):
    """Bytes of the layers quantize_model swaps, in bf16 (the denominator of the quantized-layers ratio)."""
    with torch.device("meta"):
        dit = LongCatImageDiT(config(preset))
    return sum(dit.get_submodule(n).weight.numel() * 2 + (dit.get_submodule(n).bias.numel() * 2
               if dit.get_submodule(n).bias is not None else 0) for n in quantizable(dit, dit_skip(mod)))


def time_steps(preset, precisions, warmup, steps):
    batch = make_batch(preset)
    fns = {p: lora_step_fn(build(preset, p)) for p in precisions}
    for _ in range(warmup):
        for f in fns.values():
            f(batch)
    times = {p: [] for p in precisions}
    for i in range(steps):  # interleaved, order alternating: drift of the shared machine hits all alike
        for p in (precisions if i % 2 == 0 else precisions[::-1]):
            t0 = time.perf_counter()
            fns[p](batch)
            times[p].append(time.perf_counter() - t0)
    return {p: sorted(t)[len(t) // 2] for p, t in times.items()}


def gpu_kernels():
    if not torch.cuda.is_available():
        print("(c) GPU kernels: skipped: no CUDA device")
        return
    import triton.testing

    from kernels.quant_matmul import QuantMatmulTriton
    from quant.linear import quantize_weight
    print(f"(c) GPU kernels on {torch.cuda.get_device_name()} (ms, median of do_bench; speedup = bf16 / ours)")
    print("| M | K | N | pass | bf16 F.linear | int8 | fp8 | int8 x | fp8 x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for M in (4096, 37440):
        for K, N in ((4096, 4096), (4096, 12288), (4096, 11008), (11008, 4096)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            qs = {f: quantize_weight(w, f) for f in ("int8", "fp8")}
            gy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            for name in ("fwd", "fwd+dgrad"):
                def run(fn):
                    if name == "fwd":
                        return triton.testing.do_bench(lambda: fn(x.detach()))
                    return triton.testing.do_bench(lambda: torch.autograd.grad(fn(x), x, gy))
                ref = run(lambda a: F.linear(a, w))
                ours = [run(lambda a, f=f: QuantMatmulTriton.apply(a, qs[f][0], qs[f][1], None)) for f in qs]
                print(f"| {M} | {K} | {N} | {name} | {ref:.3f} | {ours[0]:.3f} | {ours[1]:.3f} | "
                      f"{ref / ours[0]:.2f}x | {ref / ours[1]:.2f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem-preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--time-preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--precisions", nargs="+", default=PRECISIONS)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-mem", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.child:
        print("RESULT " + json.dumps(child_memory(args.mem_preset, args.child)))
        return
    cfg = config(args.mem_preset)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    p = PRESETS[args.mem_preset]
    print(f"(a) memory: preset {args.mem_preset}: D={cfg.dim}, {cfg.num_layers}+{cfg.num_single_layers} blocks, "
          f"batch 1 x ({p['text']} text + {p['grid'] ** 2} image tokens), LoRA r32 on the official targets, bf16")
    res = [] if args.skip_mem else [run_child(args, args.mem_preset, prec) for prec in args.precisions]
    layer_bf16 = bf16_layer_bytes(args.mem_preset)
    with torch.device("meta"):
        print(f"base parameters {sum(t.numel() for t in LongCatImageDiT(cfg).parameters()) / 1e9:.3f}B, "
              f"quantized layers {layer_bf16 / 2 / 1e9:.3f}B")
    ref = next((r for r in res if r["precision"] == "bf16" and "error" not in r), None)
    print("| precision | weight MiB | ratio | quantized layers ratio | resident MiB | step peak MiB | step peak ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        if "error" in r:
            print(f"| {r['precision']} | failed: {r['error']} |")
            continue
        mib = 2 ** 20
        ratio = r["weight_bytes"] / ref["weight_bytes"] if ref else float("nan")
        qratio = r["quant_bytes"] / bf16_layer_bytes(args.mem_preset, r["precision"].endswith("+mod")) \
            if r["quant_bytes"] else 1.0
        pr = r["step_peak"] / ref["step_peak"] if ref else float("nan")
        print(f"| {r['precision']} | {r['weight_bytes'] / mib:.0f} | {ratio:.3f} | "
              f"{qratio:.4f} | {r['resident'] / mib:.0f} | {r['step_peak'] / mib:.0f} | {pr:.3f} |")
    if not args.skip_time:
        t = time_steps(args.time_preset, args.precisions, args.warmup, args.steps)
        tc = config(args.time_preset)
        print(f"(b) CPU step time: preset {args.time_preset} (D={tc.dim}, {tc.num_layers}+{tc.num_single_layers} "
              f"blocks), median of {args.steps} steps after {args.warmup} warm-up, interleaved")
        print("| precision | step ms | vs bf16 |")
        print("|---|---|---|")
        for prec, s in t.items():
            print(f"| {prec} | {s * 1000:.0f} | {s / t.get('bf16', s):.2f}x |")
    gpu_kernels()


if __name__ == "__main__":
    main()
