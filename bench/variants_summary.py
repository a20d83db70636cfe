#!/usr/bin/env python3
"""Summary of bench/gpu_variants.py results: per case and pass, every variant's time against the default
and against the targets of the issues, fastest first, with the device time of each kernel of the profiled
variants.

    python3 bench/variants_summary.py FILE.json [FILE.json ...]

The default of a provider is its variant labelled exactly "triton", "cuda default" (attention) or
"cuda staged" (prompt_add). Targets (forward passes at the benchmark shapes): at least 60 % of the
copy bandwidth for the fewest bytes the op moves, and for prompt_add at least 2.5x the unfused modules
measured in the same files. Records of several files (e.g. the Triton and the CUDA runs of
bench/gpu_tune.sh on one machine) are merged.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

DEFAULTS = {("attention", "triton"): "triton", ("attention", "cuda"): "cuda default",
            ("prompt_add", "triton"): "triton", ("prompt_add", "cuda"): "cuda staged"}
BW_TARGET = 0.60
UNFUSED_SPEEDUP_TARGET = 2.5


def summarize(records: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for r in records:
        if "ms" in r and "pass" in r:
            groups[r["section"], r["case"], r["pass"]].append(r)
    lines = []
    for (section, case, pass_), rows in groups.items():
        rows.sort(key=lambda r: r["ms"])
        defaults = {p: next((r["ms"] for r in rows if r["variant"] == DEFAULTS.get((section, p))), None)
                    for p in ("triton", "cuda")}
        unfused = next((r["ms"] for r in rows if r["variant"] == "unfused"), None)
        lines.append(f"{section} {case} {pass_}")
        for r in rows:
            base = defaults.get(r["provider"])
            vs_default = f"{base / r['ms']:5.2f}x default" if base else " " * 13
            notes = []
            if pass_ == "fwd" and r["provider"] != "unfused":
                notes.append(f"{'MEETS' if r['bw_frac'] >= BW_TARGET else 'below'} 60 %")
                if section == "prompt_add" and unfused:
                    speedup = unfused / r["ms"]
                    notes.append(f"{speedup:.2f}x unfused ({'MEETS' if speedup >= UNFUSED_SPEEDUP_TARGET else 'below'}"
                                 f" 2.5x)")
            errs = "".join(f"  {k.replace('rel_err_', 'err ')} {v:.1e}" for k, v in r.items()
                           if k.startswith("rel_err_"))
            lines.append(f"  {r['variant']:<28} {r['ms']:.4f} ms {100 * r['bw_frac']:5.1f}% {vs_default}  "
                         f"{', '.join(notes)}{errs}")
            if r.get("kernels"):
                lines.append("      kernels (eager, ms per call): " + ", ".join(
                    f"{_short(name)} {ms:.4f}" + (f" x{calls}" if calls != 1 else "") for name, calls, ms in r["kernels"]))
    return lines


def _short(kernel: str) -> str:
    """A kernel's name without the package's prefixes: ``_local_attn_fwd_tiled_kernel`` -> ``fwd_tiled``."""
    for prefix in ("_local_attn_", "_"):
        if kernel.startswith(prefix):
            kernel = kernel[len(prefix):]
    return kernel.removesuffix("_kernel")[:40]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    records = []
    for path in args.files:
        with open(path) as f:
            data = json.load(f)
        records += data.get("records", [])
        meta = data.get("meta", {})
        print(f"{path}: {meta.get('device')} at {meta.get('git')}, copy bandwidth "
              f"{data.get('bandwidth', {}).get('gbps', float('nan')):.0f} GB/s")
    print("\n".join(summarize(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
