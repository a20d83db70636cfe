#!/usr/bin/env python3
"""SA2VP training step (forward + backward + AdamW) on the CPU: fused kernels vs backend="reference".

    python bench/e2e_cpu.py [--batch 4] [--steps 2] [--models vit_base_patch16_224,swin_base_patch4_window7_224]
                            [--amp fp32,bf16]

Both backends run side by side in one process on the same inputs (224 x 224, random weights: timing
only), in each precision of ``--amp`` (fp32 by default; bf16: CPU autocast, as ``sa2vp train --amp bf16``
runs it); the median step time of each, the fused/reference ratio and, with both precisions, the
bf16/fp32 ratio of the fused model are printed and written to bench/results/cpu-e2e-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (bench/, the script's own folder)
import sa2vp  # noqa: E402
import sa2vp_kernels as sk  # noqa: E402


def build(name: str, backend: str, num_classes: int = 100):
    if sa2vp.is_swin_backbone(name):
        return sa2vp.SA2VPSwin(name, num_classes, sa2vp.SA2VPSwinConfig(backend=backend))
    return sa2vp.SA2VP(name, num_classes, sa2vp.SA2VPConfig(backend=backend))


def time_steps(model, images, target, warm: int, steps: int, amp: str = "fp32") -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3, weight_decay=1e-4)
    times = []
    for i in range(warm + steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss = model.loss(model(images), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per backend (after one warm-up step)")
    p.add_argument("--models", default="vit_base_patch16_224,swin_base_patch4_window7_224")
    p.add_argument("--amp", default="fp32", help="comma-separated precisions: fp32, bf16 (CPU autocast)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    amps = args.amp.split(",")
    if not amps or any(a not in ("fp32", "bf16") for a in amps):
        p.error(f"--amp takes fp32 and/or bf16, got {args.amp!r}")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, generator=g)
    target = torch.randint(0, 100, (args.batch,), generator=g)
    records = []
    for name in args.models.split(","):
        rows = {}
        for amp in amps:
            row = {"model": name, "batch": args.batch, "dtype": "float32", "amp": amp}
            for backend in ("cpu", "reference"):
                torch.manual_seed(0)
                model = build(name, backend)
                times = time_steps(model, images, target, warm=1, steps=args.steps, amp=amp)
                row[f"{backend}_s"] = statistics.median(times)
                print(f"{name:<32} {amp:<5} {backend:<10} {row[f'{backend}_s']:8.2f} s/step", flush=True)
                del model
            row["speedup"] = row["reference_s"] / row["cpu_s"]
            print(f"{name:<32} {amp:<5} fused (cpu) vs reference: {row['speedup']:.2f}x", flush=True)
            rows[amp] = row
            records.append(row)
        if len(rows) == 2:
            rows["bf16"]["speedup_vs_fp32"] = rows["fp32"]["cpu_s"] / rows["bf16"]["cpu_s"]
            print(f"{name:<32} fused, bf16 autocast vs fp32: {rows['bf16']['speedup_vs_fp32']:.2f}x", flush=True)
    meta = {"device": common.device_name("cpu"), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "kernel_threads": sk.cpu_threads(),
            "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    out = Path(args.out) / f"cpu-e2e-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
