#!/usr/bin/env python3
"""Turn benchmark results files (``bench/results/*.json``) into Markdown tables and a log-log plot.

    python3 bench/report.py                         # every results file in bench/results
    python3 bench/report.py RESULTS.json --summary  # also print the main tables

For each file ``X.json`` it writes ``X.md`` (tables for the README's performance section) and
``X.png`` (time against sequence length N per provider, log-log, with peak memory where measured) next
to it, or into ``--out-dir``.  Works on CPU results (pytest suite) and GPU results (run_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDER_ORDER = ("auto", "cuda", "triton", "cpu", "cpu-avx2", "cpu-generic", "reference", "unfused",
                  "unfused_compiled", "sdpa_masked", "flex", "natten", "gemms")
PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "train", "infer")
MIN_BW_BYTES = 16 << 20  # smaller working sets sit in cache: a fraction of memory bandwidth means little
SECTIONS = {
    "attention": "Local cross attention",
    "windows": "Local cross attention: window size",
    "scaling": "Local cross attention: sequence length",
    "prompt_add": "prompt_add (LayerNorm, adapter, dropout, scaled add)",
    "prompt_map": "prompt_map (resample, up-projection, positional embedding)",
    "host": "Host time per call (tiny inputs: entry point, checks, autograd, dispatch)",
    "tune": "Triton launch configurations (forward; CUDA-graph times on a GPU)",
}


def _order(values, preferred):
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.4f}"


def _cell(rec: dict | None, show_bw: bool) -> str:
    if rec is None:
        return "-"
    if rec.get("error"):
        return "error"
    text = _fmt_ms(rec["ms"])
    if rec.get("ms_graph") is not None:
        text += f" / {_fmt_ms(rec['ms_graph'])}"
    frac = rec.get("bw_frac_graph", rec.get("bw_frac"))
    if show_bw and frac is not None and rec.get("bytes", 0) >= MIN_BW_BYTES:
        text += f" ({100 * frac:.0f}%)"
    return text


def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _case_key(rec: dict):
    return (rec.get("N", 0), rec.get("window", 0), -rec.get("heads", 0), rec.get("dropout_p", 0), rec["case"])


def section_table(records: list, section: str, show_bw: bool = True) -> list:
    """Rows (case, pass) x columns (provider): median ms and the fraction of copy bandwidth."""
    recs = [r for r in records if r["section"] == section]
    if not recs:
        return []
    providers = _order([r["provider"] for r in recs], PROVIDER_ORDER)
    cases = sorted({r["case"]: r for r in recs}.values(), key=_case_key)
    index = {(r["case"], r["pass"], r["provider"]): r for r in recs}
    rows = []
    for c in cases:
        for pass_ in _order([r["pass"] for r in recs if r["case"] == c["case"]], PASS_ORDER):
            rows.append([c["case"], pass_] + [_cell(index.get((c["case"], pass_, p)), show_bw) for p in providers])
    return _table(["case", "pass"] + providers, rows)


def memory_table(records: list, section: str) -> list:
    recs = [r for r in records if r["section"] == section and r.get("peak_mib") is not None and r["pass"] == "fwd+bwd"]
    if not recs:
        return []
    providers = _order([r["provider"] for r in recs], PROVIDER_ORDER)
    cases = sorted({r["case"]: r for r in recs}.values(), key=_case_key)
    index = {(r["case"], r["provider"]): r for r in recs}
    rows = [[c["case"]] + [f"{index[(c['case'], p)]['extra_mib']:.0f}" if (c["case"], p) in index else "-"
                           for p in providers] for c in cases]
    return _table(["case (fwd+bwd, MiB above the inputs)"] + providers, rows)


def accuracy_table(records: list) -> list:
    recs = [r for r in records if r.get("rel_err_out") is not None and r["section"] in ("attention", "prompt_add",
                                                                                       "prompt_map", "windows")]
    seen, rows = set(), []
    for r in sorted(recs, key=lambda r: (r["section"], _case_key(r), r["provider"])):
        key = (r["section"], r["case"], r["provider"])
        if key in seen:
            continue
        seen.add(key)
        grad = r.get("rel_err_grad")
        rows.append([r["section"], r["case"], r["provider"], f"{r['rel_err_out']:.1e}",
                     "-" if grad is None else f"{grad:.1e}"])
    if not rows:
        return []
    return _table(["section", "case", "provider", "output", "gradients"], rows)


def end_to_end_table(records: list) -> list:
    recs = [r for r in records if r["section"] == "end_to_end"]
    if not recs:
        return []
    rows = []
    for r in sorted(recs, key=lambda r: (r.get("img_size", 0), PASS_ORDER.index(r["pass"]) if r["pass"] in PASS_ORDER else 9,
                                         r["provider"])):
        if r.get("error"):
            rows.append([r["case"], r["provider"], "error", "-", "-"])
            continue
        peak = r.get("peak_mib")
        ips = r["images_per_s"]
        rows.append([r["case"], r["provider"], f"{r['ms']:.1f}", f"{ips:.0f}" if ips >= 100 else f"{ips:.3g}",
                     "-" if peak is None else f"{peak / 1024:.1f}"])
    return _table(["case", "backend", "ms / step", "images / s", "peak GiB"], rows)


def ratio_table(ratios: list, passes=None) -> list:
    rows = []
    for r in ratios:
        if passes is not None and r["pass"] not in passes:
            continue
        target = f">= {r['target']:g}x ({'met' if r['met'] else 'NOT met'})" if "target" in r else ""
        of_min = f"{r['speedup_of_min']:.2f}x" if r.get("speedup_of_min") else "-"
        rows.append([r["section"], r["case"], r["pass"], r["ours"], r["baseline"], f"{r['speedup']:.2f}x", of_min,
                     target])
    if not rows:
        return []
    return _table(["section", "case", "pass", "ours", "baseline", "speed-up (medians)", "(minima)", "target"], rows)


def header(results: dict) -> list:
    meta = results["meta"]
    load = meta.get("load_avg_1m")
    load = "" if load is None else f" (1-minute load average {load:.1f})"
    lines = [f"## {meta['device']} ({meta['date']})", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"Python {meta.get('python')}, {meta.get('cpu_threads')} CPU threads{load}, "
             f"source: {meta.get('source')}, commit {meta.get('git')} (sources {meta.get('source_digest')})."]
    bw = results.get("bandwidth")
    graphs = any(r.get("ms_graph") is not None for r in results.get("records", []))
    times = ("Cells: median ms of eager calls / of CUDA-graph replays (host launch overhead left out)"
             if graphs else "Times are medians in ms")
    if bw:
        lines.append(f"Measured copy bandwidth: {bw['gbps']:.0f} GB/s (bytes read + written). {times}; the "
                     f"percentage is the achieved fraction of that bandwidth for the fewest bytes the op must "
                     f"move{' (from the graph time)' if graphs else ''}, shown where that is at least "
                     f"{MIN_BW_BYTES >> 20} MiB.")
    else:
        lines.append(f"{times}.")
    if meta.get("auto_backend"):
        lines.append(f"backend=\"auto\" resolves to {meta['auto_backend']!r} here.")
    return lines + [""]


def markdown(results: dict) -> str:
    records = results.get("records", [])
    lines = header(results)
    for section, title in SECTIONS.items():
        table = section_table(records, section)
        if table:
            lines += [f"### {title}", ""] + table + [""]
        mem = memory_table(records, section)
        if mem:
            lines += [f"Peak memory, {title.lower()}:", ""] + mem + [""]
    e2e = end_to_end_table(records)
    if e2e:
        lines += ["### SA2VP end to end (training step: fwd + bwd + AdamW)", ""] + e2e + [""]
    acc = accuracy_table(records)
    if acc:
        lines += ["### Accuracy (||x - ref|| / ||ref|| against a float32 reference)", ""] + acc + [""]
    ratios = ratio_table(results.get("ratios", []))
    if ratios:
        lines += ["### Speed-ups", ""] + ratios + [""]
    prof = profile_table(results.get("profile", []))
    if prof:
        lines += ["### Kernel profile (one fwd+bwd call, torch.profiler; ms per call)", ""] + prof + [""]
    problems = [f"- {r['section']} {r['case']} {r['provider']} {r['pass']}: {r['error']}"
                for r in records if r.get("error")]
    problems += [f"- profile {r['section']} {r['case']} {r['provider']}: {r['error']}"
                 for r in results.get("profile", []) if r.get("error")]
    problems += [f"- skipped {s['section']} {s['what']}: {s['reason']}" for s in results.get("skipped", [])]
    problems += [f"- section {k} failed: {v.strip().splitlines()[-1]}" for k, v in results.get("errors", {}).items()]
    if problems:
        lines += ["### Errors and skipped items", ""] + problems + [""]
    return "\n".join(lines)


def profile_table(profiles: list, top: int = 6) -> list:
    """Per profiled call: wall time, total kernel time and its largest kernels."""
    rows = []
    for p in profiles:
        if p.get("error"):
            continue
        kernels = "; ".join(f"{name[:60]} {ms:.4f} x{calls}" for name, calls, ms in p["kernels"][:top])
        rows.append((p["section"], p["case"], p["provider"], f"{p['wall_ms']:.4f}", f"{p['kernel_ms']:.4f}",
                     kernels or "-"))
    return _table(("section", "case", "provider", "wall", "kernels", "largest kernels (ms, calls)"), rows) if rows else []


def summary(results: dict) -> str:
    """The main tables only, for a terminal."""
    records = results.get("records", [])
    lines = header(results)
    for section in ("attention", "prompt_add"):
        table = section_table(records, section)
        if table:
            lines += [SECTIONS[section], ""] + table + [""]
    e2e = end_to_end_table(records)
    if e2e:
        lines += ["SA2VP end to end", ""] + e2e + [""]
    ratios = [r for r in results.get("ratios", []) if r["pass"] in ("fwd+bwd", "train", "infer")
              and r["section"] in ("attention", "prompt_add", "end_to_end")]
    table = ratio_table(ratios)
    if table:
        lines += ["Speed-ups (fwd+bwd, model steps)", ""] + table + [""]
    prof = profile_table(results.get("profile", []), top=3)
    if prof:
        lines += ["Kernel profile (one fwd+bwd call, ms)", ""] + prof + [""]
    n_err = sum(1 for r in records if r.get("error")) + len(results.get("errors", {}))
    lines.append(f"{len(records)} measurements, {n_err} errors, {len(results.get('skipped', []))} skipped items.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Log-log time against N per provider (section "scaling"), one panel per pass, plus peak memory."""
    recs = [r for r in results.get("records", []) if r["section"] == "scaling" and not r.get("error")]
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    passes = _order([r["pass"] for r in recs], PASS_ORDER)
    mem = [r for r in recs if r.get("peak_mib") is not None and r["pass"] == "fwd+bwd"]
    panels = len(passes) + (1 if mem else 0)
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 5 * panels), 4.4), squeeze=False)
    axes = axes[0]
    providers = _order([r["provider"] for r in recs], PROVIDER_ORDER)
    first = recs[0]
    title = (f"B={first.get('B')}, {first.get('heads')}x{first.get('head_dim')}, window {first.get('window')}, "
             f"{first.get('dtype')}")

    def draw(ax, rows, key, ylabel):
        for p in providers:
            pts = sorted((r["N"], r[key]) for r in rows if r["provider"] == p and r.get(key) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ns = sorted({r["N"] for r in rows})
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)

    for ax, pass_ in zip(axes, passes):
        draw(ax, [r for r in recs if r["pass"] == pass_], "ms", "median time (ms)")
        ax.set_title(f"{pass_}")
    if mem:
        draw(axes[-1], mem, "extra_mib", "peak memory above inputs (MiB)")
        axes[-1].set_title("fwd+bwd peak memory")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['meta']['device']}\nlocal cross attention, {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(path: Path, out_dir: Path | None = None, make_plot: bool = True) -> list:
    results = json.loads(Path(path).read_text())
    out_dir = Path(out_dir) if out_dir is not None else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / (Path(path).stem + ".md")
    md.write_text(markdown(results))
    written = [md]
    if make_plot:
        png = out_dir / (Path(path).stem + ".png")
        if plot(results, png):
            written.append(png)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/*.json)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write (default: next to each file)")
    parser.add_argument("--no-plot", action="store_true", help="Markdown only")
    parser.add_argument("--summary", action="store_true", help="print the main tables of each file")
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no results files in {RESULTS_DIR}", file=sys.stderr)
        return 1
    for f in files:
        data = json.loads(Path(f).read_text())
        if not isinstance(data, dict) or "records" not in data:
            print(f"{f}: not a benchmark results file (no records), skipped", file=sys.stderr)
            continue
        written = report(f, args.out_dir, make_plot=not args.no_plot)
        print(f"{f}: wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
        if args.summary:
            print(summary(json.loads(Path(f).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
