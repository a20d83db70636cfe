#!/usr/bin/env python3
"""SA2VP training step (forward + backward + AdamW) on the CPU: fused kernels vs backend="reference".

    python bench/e2e_cpu.py [--batch 4] [--steps 2] [--models vit_base_patch16_224,swin_base_patch4_window7_224]

Both backends run side by side in one process on the same inputs (fp32, 224 x 224, random weights:
timing only); the median step time of each and their ratio are printed and written to
bench/results/cpu-e2e-<date>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sa2vp  # noqa: E402


def build(name: str, backend: str, num_classes: int = 100):
    if sa2vp.is_swin_backbone(name):
        return sa2vp.SA2VPSwin(name, num_classes, sa2vp.SA2VPSwinConfig(backend=backend))
    return sa2vp.SA2VP(name, num_classes, sa2vp.SA2VPConfig(backend=backend))


def time_steps(model, images, target, warm: int, steps: int) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-3, weight_decay=1e-4)
    times = []
    for i in range(warm + steps):
        t0 = time.perf_counter()
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
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, generator=g)
    target = torch.randint(0, 100, (args.batch,), generator=g)
    records = []
    for name in args.models.split(","):
        row = {"model": name, "batch": args.batch, "dtype": "float32"}
        for backend in ("cpu", "reference"):
            torch.manual_seed(0)
            model = build(name, backend)
            times = time_steps(model, images, target, warm=1, steps=args.steps)
            row[f"{backend}_s"] = statistics.median(times)
            print(f"{name:<32} {backend:<10} {row[f'{backend}_s']:8.2f} s/step", flush=True)
            del model
        row["speedup"] = row["reference_s"] / row["cpu_s"]
        print(f"{name:<32} fused (cpu) vs reference: {row['speedup']:.2f}x", flush=True)
        records.append(row)
    meta = {"device": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}
    out = Path(args.out) / f"cpu-e2e-{meta['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": records}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
