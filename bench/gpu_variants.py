#!/usr/bin/env python3
"""CUDA-graph timings of the kernel variants that environment variables select, side by side, at the
benchmark shapes (B=64, 14x14 + CLS, C=768, bfloat16), on one GPU; for choosing the defaults.

    python3 bench/gpu_variants.py --out DIR          # writes DIR/<device>-<date>-variants.json

Rows: the local attention forward (1 x 768 and 12 x 64) of the CUDA kernels with and without the
tiled forward (SA2VP_CUDA_ATTN_TILED) and of the Triton kernels; prompt_add (p = 0.1) forward and
forward + backward of the CUDA kernels with and without the staged forward
(SA2VP_CUDA_PROMPT_ADD_STAGED), of the Triton kernels and of the unfused nn modules. The attention
rows also report the error of the output against the float64 reference (bench/common.py); every row
the share of the measured copy bandwidth for the fewest bytes the op must move.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, provider, environment)
ATTENTION = [
    ("cuda default", "cuda", {"SA2VP_CUDA_ATTN_TILED": "0"}),
    ("cuda tiled", "cuda", {"SA2VP_CUDA_ATTN_TILED": "1"}),
    ("triton", "triton", {}),
]
PROMPT_ADD = [
    ("cuda not staged", "cuda", {"SA2VP_CUDA_PROMPT_ADD_STAGED": "0"}),
    ("cuda staged", "cuda", {"SA2VP_CUDA_PROMPT_ADD_STAGED": "1"}),  # the default
    ("triton", "triton", {}),
    ("unfused", "unfused", {}),  # nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout and adds: the baseline
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder of the results file (default bench/results)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a dry run, also on the CPU)")
    args = parser.parse_args(argv)
    if not os.path.exists("/dev/nvidia0"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    import common

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device; use --tiny for a dry run", file=sys.stderr)
        return 2
    batch, dtype = (64, torch.bfloat16) if not args.tiny else (2, torch.float32)
    layouts = ((1, 768), (12, 64)) if not args.tiny else ((1, 32), (4, 8))
    grid = (14, 14) if not args.tiny else (4, 5)
    B, N, C, r = (64, 197, 768, 16) if not args.tiny else (2, 21, 32, 4)
    results = common.new_results(device, source="bench/gpu_variants.py" + (" --tiny" if args.tiny else ""))
    out = Path(args.out or common.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{results['meta']['device_tag']}-{results['meta']['date']}-variants.json"
    copy = common.copy_bandwidth(device, (1 << 30) if not args.tiny else (16 << 20))
    results["bandwidth"] = copy
    print(f"{results['meta']['device']}: copy bandwidth {copy['gbps']:.0f} GB/s", flush=True)

    def timed(fn):
        if device.type == "cuda":
            return common.time_cuda_graph(fn, device, rep_ms=10)["ms_graph"]
        return common.time_fn(fn, device, warmup_ms=1, rep_ms=5)["ms"]

    def row(section, case, label, provider, env, passes, make, errors):
        try:
            with common.environment(**env):  # (the extension reads the variant switches at every launch)
                work = make(provider, case)
                err = errors(work, case) if errors else {}
                for pass_ in passes:
                    rec = {"section": section, "case": case.label, "variant": label, "provider": provider,
                           "pass": pass_, **err}
                    try:
                        rec["ms"] = timed(work.runner(pass_))
                        rec["bytes"] = case.bytes(pass_)
                        rec["bw_frac"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9 / copy["gbps"]
                    except Exception as exc:  # a variant that fails is recorded, the others still run
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    results["records"].append(rec)
                    msg = (f"{rec['ms']:.4f} ms {100 * rec['bw_frac']:5.1f}% of copy bw" if "ms" in rec
                           else rec["error"])
                    e = rec.get("rel_err_out")
                    print(f"{section:<10} {case.label:<36} {label:<13} {pass_:<8} {msg}"
                          + (f"  err {e:.1e}" if e is not None else ""), flush=True)
        except Exception as exc:
            results["records"].append({"section": section, "case": case.label, "variant": label,
                                       "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{section:<10} {case.label:<36} {label:<13} ERROR {exc}", flush=True)
        finally:
            common.write_results(results, [path])

    for heads, dim in layouts:
        case = common.AttnCase(batch, heads, dim, grid=grid, window=3, border="clip", dtype=dtype)
        for label, provider, env in ATTENTION:
            row("attention", case, label, provider, env, ("fwd",),
                lambda p, c: common.attention_workload(p, c, device,
                                                       n_sets=common.rotation(3 * c.tensor_bytes(), device)),
                common.attention_errors)
    case = common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=0.1, dtype=dtype)
    for label, provider, env in PROMPT_ADD:
        row("prompt_add", case, label, provider, env, ("fwd", "fwd+bwd"),
            lambda p, c: common.prompt_add_workload(p, c, device, n_sets=2), None)
    common.write_results(results, [path])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
