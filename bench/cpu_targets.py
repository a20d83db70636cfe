#!/usr/bin/env python3
"""The CPU targets of the kernels, timed with the providers interleaved round by round.

    python bench/cpu_targets.py [--rounds 60] [--threads 1] [--out bench/results]

pytest-benchmark times one provider after the other, so on a shared machine a slow spell can fall on
one of them and skew a ratio. Here every round calls each provider once, in a rotating order, and the
ratios are taken between the medians over all rounds, with the spread of the per-round ratios
(quartiles). Cases: forward + backward of local cross attention (B=8, 14x14 + CLS, 1 x 768 and 12 x 64,
float32) against the vectorised reference and masked SDPA, and of prompt_add (B=8, N=197, C=768, r=16,
p = 0 and 0.1) against the unfused nn composition and the six low-rank matmuls alone. With --threads
above 1, the cpu kernels also run on one thread in the same rounds (their scaling). Writes
bench/results/cpu-targets-<date>.json (-<threads>-threads.json with more than one) and prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

common.use_triton_interpreter_without_gpu()

import torch  # noqa: E402

CPU = torch.device("cpu")


def cases():
    """(name, case, {provider: workload}, ours, target baseline, target ratio)."""
    for heads, dim in ((1, 768), (12, 64)):
        case = common.AttnCase(8, heads, dim, grid=(14, 14))
        yield ("attention", case, {p: common.attention_workload(p, case, CPU)
                                   for p in ("cpu", "reference", "sdpa_masked")}, "reference", 5.0)
    for p in (0.0, 0.1):
        case = common.PromptAddCase(8, 197, 768, 16, scale=0.1, dropout_p=p)
        yield ("prompt_add", case, {q: common.prompt_add_workload(q, case, CPU)
                                    for q in ("cpu", "unfused", "gemms")}, "unfused", 3.0)


def quartiles(values: list) -> tuple:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60, help="timed rounds per case (after 3 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: steadier on a shared machine); with more than one, the cpu "
                         "kernels are also timed on one thread in the same rounds (baseline cpu_1_thread)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.rounds < 2:
        ap.error(f"--rounds must be at least 2 (the per-round ratios' quartiles need two), got {args.rounds}")
    torch.set_num_threads(args.threads)
    results = common.new_results(CPU, source="bench/cpu_targets.py (interleaved rounds)")
    results["meta"]["rounds"] = args.rounds
    rows = []
    for section, case, works, baseline_for_target, target in cases():
        runners = {p: w.runner("fwd+bwd") for p, w in works.items()}
        threads = {p: args.threads for p in runners}
        if args.threads > 1:
            # the same kernels on one thread, in the same rounds: how they scale with the threads
            runners["cpu_1_thread"], threads["cpu_1_thread"] = runners["cpu"], 1
        names = list(runners)
        times = {p: [] for p in names}
        for r in range(3 + args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for p in order:
                torch.set_num_threads(threads[p])
                t0 = time.perf_counter()
                runners[p]()
                if r >= 3:
                    times[p].append(time.perf_counter() - t0)
            if r >= 3 and (r - 2) % 20 == 0:
                print(f"  {section} {case.label}: {r - 2}/{args.rounds} rounds", flush=True)
        torch.set_num_threads(args.threads)
        med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        for base in names[1:]:
            per_round = [b / a for a, b in zip(times["cpu"], times[base])]
            lo, hi = quartiles(per_round)
            row = {"section": section, "case": case.label, "pass": "fwd+bwd", "ours": "cpu", "baseline": base,
                   "ours_ms": med["cpu"], "baseline_ms": med[base], "speedup": med[base] / med["cpu"],
                   "round_ratio_q1": lo, "round_ratio_q3": hi}
            if base == baseline_for_target:
                row.update(target=target, met=row["speedup"] >= target)
            rows.append(row)
            print(f"{section:<11} {case.label:<32} cpu {med['cpu']:8.2f} ms  {base:<12} {med[base]:8.2f} ms  "
                  f"{row['speedup']:6.2f}x (per round {lo:.2f}-{hi:.2f})"
                  + (f"  target >= {target:g}x: {'met' if row['met'] else 'NOT met'}" if "target" in row else ""),
                  flush=True)
    results["ratios"] = rows
    suffix = "" if args.threads == 1 else f"-{args.threads}-threads"
    out = common.write_json(Path(args.out) / f"cpu-targets-{results['meta']['date']}{suffix}.json", results)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
