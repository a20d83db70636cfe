#!/usr/bin/env python3
"""Hardware counters of the fused forwards at the benchmark shapes, with Nsight Compute (ncu), on a GPU.

    python scripts/kernel_metrics.py                 # runs itself under ncu, prints one table
    python scripts/kernel_metrics.py --only triton   # only the Triton kernels (no compiled extension needed)
    python scripts/kernel_metrics.py --calls         # (what ncu runs: one call of each kernel)

Per kernel launch: duration, DRAM / L2 / L1 bytes, L1 hit rate, achieved occupancy. Those say whether a
kernel moves more bytes than the op needs (re-reads through L2 or L1) or waits on latency (few warps).
The rows are labelled with the call that launched them (CUDA kernels with and without their variant
switches; Triton kernels with their defaults and with the variants of bench/gpu_variants.py).
Without ncu, or without permission to read the counters, it says so and exits 0.
"""
import os
import shutil
import subprocess
import sys

METRICS = [
    "gpu__time_duration.sum",
    "dram__bytes.sum",
    "lts__t_bytes.sum",
    "l1tex__t_bytes.sum",
    "l1tex__t_sector_hit_rate.pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
]


def _calls(only):
    """(label, number of kernel launches, function) of every call, in launch order."""
    import torch
    import sa2vp_kernels as sk

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = {}
    for heads, dim in ((1, 768), (12, 64)):
        qkv[heads, dim] = [torch.randn(64, heads, 197, dim, device=dev, dtype=torch.bfloat16, generator=g)
                           for _ in range(3)]
    B, N, C, r = 64, 197, 768, 16

    def rn(*s, scale=1.0):
        return (torch.randn(*s, device=dev, generator=g) * scale).to(torch.bfloat16)

    args = (rn(B, N, C), rn(B, N, C), 1 + rn(C, scale=0.1), rn(C, scale=0.1), rn(r, C, scale=C ** -0.5),
            rn(r, scale=0.1), rn(C, r, scale=r ** -0.5), rn(C, scale=0.1), None, None)
    out = []
    if only in ("all", "cuda"):
        for heads, dim in qkv:
            out.append((f"cuda attention {heads}x{dim}", 1, lambda hd=(heads, dim): sk.local_cross_attention(
                *qkv[hd], (14, 14), backend="cuda")))

        def cuda_prompt_add(staged):
            os.environ["SA2VP_CUDA_PROMPT_ADD_STAGED"] = staged
            torch.ops.sa2vp_kernels.prompt_add_fwd(*args, 0.1, 0.1, 1e-6, 7)

        out.append(("cuda prompt_add not staged", 1, lambda: cuda_prompt_add("0")))
        out.append(("cuda prompt_add staged", 1, lambda: cuda_prompt_add("1")))
    if only in ("all", "triton"):
        from sa2vp_kernels.triton import prompt_add as tpa
        from sa2vp_kernels.triton import tuning

        def with_settings(fn, op, **settings):
            """fn with these launch settings (tuning.override: no tuned file applies, so every row is
            labelled by what it runs)."""
            def call():
                with tuning.override(**{op: settings}):
                    fn()
            return call

        for heads, dim in qkv:
            def attn(hd=(heads, dim)):
                sk.local_cross_attention(*qkv[hd], (14, 14), backend="triton")

            out.append((f"triton attention {heads}x{dim}", 1,
                        with_settings(attn, "local_attention", fwd_fused_prefix=False)))
            out.append((f"triton attention {heads}x{dim} fused prefix", 2,
                        with_settings(attn, "local_attention", fwd_fused_prefix=True)))
            out.append((f"triton attention {heads}x{dim} fused prefix rows4 w4", 2,
                        with_settings(attn, "local_attention", fwd_fused_prefix=True, rows=4, fwd_num_warps=4)))

        def triton_prompt_add():
            tpa.prompt_add_fwd(*args, 0.1, 0.1, 1e-6, 7)

        out.append(("triton prompt_add one pass", 1, with_settings(triton_prompt_add, "prompt_add", fwd_one_pass=True)))
        out.append(("triton prompt_add three passes", 1,
                    with_settings(triton_prompt_add, "prompt_add", fwd_one_pass=False)))
        out.append(("triton prompt_add one pass m32 w8 c128", 1, with_settings(
            triton_prompt_add, "prompt_add", fwd_one_pass=True, block_m=32, num_warps=8, block_c=128)))
    return out


def calls(only):
    import torch

    plan = _calls(only)
    for _, _, fn in plan:  # (compiles the Triton kernels before ncu's replays start)
        fn()
    torch.cuda.synchronize()
    for label, _, fn in plan:
        fn()
    torch.cuda.synchronize()


KERNELS = "local_attn_fwd_kernel|fwd_kernel|_local_attn_fwd_tiled_kernel|_combine_parts_kernel|_fwd_wide_kernel"


def main():
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else "all"
    if only not in ("all", "cuda", "triton"):
        print(f"--only must be all, cuda or triton, got {only!r}", file=sys.stderr)
        sys.exit(2)
    if "--calls" in sys.argv:
        calls(only)
        return
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        print("kernel metrics: ncu not found")
        return
    # the warm-up round is skipped: one launch per call and kernel is profiled
    import torch  # noqa: F401  (the labels need the plan, which needs a GPU only to run)
    plan_sizes = [(label, n) for label, n, _ in _calls(only)]
    warmup = sum(n for _, n in plan_sizes)
    cmd = [ncu, "--csv", "--page", "raw", "-k", f"regex:{KERNELS}", "--launch-skip", str(warmup), "--metrics",
           ",".join(METRICS), sys.executable, os.path.abspath(__file__), "--calls", "--only", only]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=int(os.environ.get("SA2VP_NCU_TIMEOUT", "300")))
    out = p.stdout
    lines = [l for l in out.splitlines() if l.startswith('"')]
    if p.returncode != 0 or len(lines) < 3:
        print(f"kernel metrics: ncu exited with {p.returncode}")
        print("\n".join((p.stdout + p.stderr).splitlines()[-15:]))
        return
    import csv
    rows = list(csv.reader(lines))
    head, units, data = rows[0], rows[1], rows[2:]
    col = {name: i for i, name in enumerate(head)}
    labels = [label for label, n in plan_sizes for _ in range(n)]
    if len(labels) != len(data):
        labels = ["?"] * len(data)
    print("call | kernel | " + " | ".join(f"{m} ({units[col[m]]})" for m in METRICS if m in col))
    for label, row in zip(labels, data):
        name = row[col["Kernel Name"]][:60] if "Kernel Name" in col else "?"
        print(f"{label} | {name} | " + " | ".join(row[col[m]] for m in METRICS if m in col))


if __name__ == "__main__":
    main()
