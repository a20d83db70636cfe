#!/usr/bin/env python3
"""Hardware counters of the fused forwards at the benchmark shapes, with Nsight Compute (ncu), on a GPU.

    python scripts/kernel_metrics.py            # runs itself under ncu, prints one table
    python scripts/kernel_metrics.py --calls    # (what ncu runs: one call of each kernel)

Per kernel launch: duration, DRAM / L2 / L1 bytes, L1 hit rate, achieved occupancy. Those say whether a
kernel moves more bytes than the op needs (re-reads through L2 or L1) or waits on latency (few warps).
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


def calls():
    import torch
    import sa2vp_kernels as sk

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    for heads, dim in ((1, 768), (12, 64)):
        q, k, v = (torch.randn(64, heads, 197, dim, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        torch.cuda.nvtx.range_push(f"attention {heads}x{dim}")
        sk.local_cross_attention(q, k, v, (14, 14), backend="cuda")
        torch.cuda.nvtx.range_pop()
    B, N, C, r = 64, 197, 768, 16

    def rn(*s, scale=1.0):
        return (torch.randn(*s, device=dev, generator=g) * scale).to(torch.bfloat16)

    args = (rn(B, N, C), rn(B, N, C), 1 + rn(C, scale=0.1), rn(C, scale=0.1), rn(r, C, scale=C ** -0.5),
            rn(r, scale=0.1), rn(C, r, scale=r ** -0.5), rn(C, scale=0.1), None, None)
    for staged in ("0", "1"):
        os.environ["SA2VP_CUDA_PROMPT_ADD_STAGED"] = staged
        torch.ops.sa2vp_kernels.prompt_add_fwd(*args, 0.1, 0.1, 1e-6, 7)
    torch.cuda.synchronize()


def main():
    if "--calls" in sys.argv:
        calls()
        return
    ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
    if ncu is None:
        print("kernel metrics: ncu not found")
        return
    cmd = [ncu, "--csv", "--page", "raw", "-k", "regex:local_attn_fwd_kernel|fwd_kernel", "--metrics",
           ",".join(METRICS), sys.executable, os.path.abspath(__file__), "--calls"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=int(os.environ.get("SA2VP_NCU_TIMEOUT", "120")))
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
    print("kernel | " + " | ".join(f"{m} ({units[col[m]]})" for m in METRICS if m in col))
    for row in data:
        name = row[col["Kernel Name"]][:70] if "Kernel Name" in col else "?"
        print(name + " | " + " | ".join(row[col[m]] for m in METRICS if m in col))


if __name__ == "__main__":
    main()
