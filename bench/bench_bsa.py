"""
Block-sparse attention (kernels/block_sparse_attention.py) vs dense `F.scaled_dot_product_attention`.

CPU part (always runs): the PyTorch path (`block_sparse_attention(..., backend="torch")`: fp32 block selection,
THW <-> chunk permutes and the gathered batched SDPA, all included in the timing) vs dense SDPA on the same fp32
[B, heads, S, D] tensors, forward and forward+backward (grads w.r.t. q, k, v). Median wall-clock over a few repeats
after one warm-up, dense and BSA runs interleaved (alternating order, bench/measure.interleaved_times) so drift of a
busy machine hits both alike; the ratio is dense / BSA and "% ideal" is that ratio over the ideal 1 / (1 - sparsity).

GPU part (only with CUDA, skipped otherwise): the Triton kernels (backend="triton": forward kernel, and for fwd+bwd
the Triton Delta / dK-dV / dQ backward kernels) vs dense SDPA with the FLASH backend forced, bf16, timed with
`triton.testing.do_bench` (median), per ../shared/specs/kernels.md §11.

    python bench/bench_bsa.py                     # CPU table (S 4096 and 16384, D 64 and 128)
    python bench/bench_bsa.py --skip-16k-d128     # drop the slowest CPU row group
    python bench/bench_bsa.py --sizes 16384 --dims 64 128 --sparsities 0.9375   # only some rows
"""
import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from measure import interleaved_times  # noqa: E402  (bench/ is this script's folder)

SPARSITIES = (0.75, 0.875, 0.9375)
GRIDS = {4096: (16, 16, 16), 16384: (16, 32, 32)}
CHUNK = (4, 4, 4)


def fwd_bwd(attn, q, k, v, do):
    def step():
        q.grad = k.grad = v.grad = None
        attn(q, k, v).backward(do)
    return step


def median_ms(steps: dict, repeats: int) -> dict:
    """{name: step()} -> {name: median ms}, the steps interleaved after one warm-up round."""
    times, _ = interleaved_times({name: (lambda _, f=f: f()) for name, f in steps.items()}, None, 1, repeats)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def cpu_section(args):
    print(f"# CPU: torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, heads={args.heads}, "
          f"chunk {CHUNK}")
    print("| S | grid | D | sparsity | pass | dense ms | BSA ms | speedup | ideal | % of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for S, grid in GRIDS.items():
        if S not in args.sizes:
            continue
        for D in args.dims:
            if S == 16384 and D == 128 and args.skip_16k_d128:
                print(f"| {S} | {grid} | {D} | - | - | skipped (--skip-16k-d128) | | | | |")
                continue
            reps = args.repeats_4k if S == 4096 else args.repeats_16k
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(1, args.heads, S, D) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()
            attns = {"dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v)}
            for s in args.sparsities:
                attns[s] = lambda q, k, v, s=s: block_sparse_attention(q, k, v, grid, CHUNK, s, backend="torch")
            with torch.no_grad():
                fwd = median_ms({name: (lambda a=a: a(q, k, v)) for name, a in attns.items()}, reps)
            fb = median_ms({name: fwd_bwd(a, q, k, v, do) for name, a in attns.items()}, reps)
            for s in args.sparsities:
                ideal = 1.0 / (1.0 - s)
                for name, md, mb in (("fwd", fwd["dense"], fwd[s]), ("fwd+bwd", fb["dense"], fb[s])):
                    r = md / mb
                    print(f"| {S} | {grid} | {D} | {s} | {name} | {md:.1f} | {mb:.1f} | {r:.2f}x | {ideal:.0f}x "
                          f"| {100 * r / ideal:.0f}% |", flush=True)


def gpu_section(args):
    if not torch.cuda.is_available():
        print("# GPU section skipped: no CUDA device")
        return
    import triton
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print(f"# GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"B=1, heads={args.gpu_heads}, chunk {CHUNK}; BSA fwd+bwd = Triton forward + Triton backward kernels")
    print("| S | grid | D | sparsity | pass | dense flash ms | BSA ms | speedup | ideal | % of ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    grids = dict(GRIDS)
    grids[math.prod((16, 48, 48))] = (16, 48, 48)  # 36,864 tokens, 480p-class
    for S, grid in grids.items():
        if S not in args.sizes and S != 36864:
            continue
        for D in args.dims:
            torch.manual_seed(0)
            q, k, v, do = (torch.randn(1, args.gpu_heads, S, D, device="cuda", dtype=torch.bfloat16)
                           for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_()

            def dense(q, k, v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v)
            with torch.no_grad():
                ms_dense_f = triton.testing.do_bench(lambda: dense(q, k, v))
            ms_dense_fb = triton.testing.do_bench(fwd_bwd(dense, q, k, v, do))
            for s in args.sparsities:
                bsa = lambda q, k, v: block_sparse_attention(q, k, v, grid, CHUNK, s, backend="triton")  # noqa: E731
                with torch.no_grad():
                    ms_f = triton.testing.do_bench(lambda: bsa(q, k, v))
                ms_fb = triton.testing.do_bench(fwd_bwd(bsa, q, k, v, do))
                ideal = 1.0 / (1.0 - s)
                for name, md, mb in (("fwd", ms_dense_f, ms_f), ("fwd+bwd", ms_dense_fb, ms_fb)):
                    r = md / mb
                    print(f"| {S} | {grid} | {D} | {s} | {name} | {md:.3f} | {mb:.3f} | {r:.2f}x | {ideal:.0f}x "
                          f"| {100 * r / ideal:.0f}% |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--repeats-4k", type=int, default=5)
    p.add_argument("--repeats-16k", type=int, default=5)
    p.add_argument("--skip-16k-d128", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=list(GRIDS), help=f"sequence lengths, from {list(GRIDS)}")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--gpu-heads", type=int, default=8)
    p.add_argument("--no-cpu", action="store_true", help="only the GPU section")
    args = p.parse_args()
    if not args.no_cpu:
        cpu_section(args)
    gpu_section(args)


if __name__ == "__main__":
    main()
