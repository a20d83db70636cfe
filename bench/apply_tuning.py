#!/usr/bin/env python3
"""Keep the fastest Triton launch settings that bench/gpu_variants.py timed on a GPU, as that GPU
model's tuned file (sa2vp_kernels/triton/tuning.py).

    python3 bench/apply_tuning.py OUT/<device>-<date>-variants-triton.json     # writes the package's file
    python3 bench/apply_tuning.py FILE.json --dry-run                          # prints the choice only

The rules, per op, from the CUDA-graph medians of one run:

* local attention, per head dim timed (1 x 768 and 12 x 64 at the benchmark shape; one entry per head-dim
  class, split between the timed head dims): the forward settings (``fwd_*``, ``rows``,
  ``fwd_num_warps``, ``stages``) of the fastest forward among the rows whose output and gradient
  errors stay within 1.5x the default's plus 1e-3; each backward switch (``bwd_fused_prefix``,
  ``bwd_stream``) where every pair of forward + backward rows that differ only in it is faster with it;
* prompt_add, the case with dropout (the training case): the forward settings (``fwd_one_pass``,
  ``block_m``, ``num_warps``, ``block_c``) of the fastest forward; each backward switch
  (``bwd_from_z``, ``bwd_finalize_kernel``) where the row that flips it alone is faster forward +
  backward than the default.

A setting is kept only where it beats the default by more than ``--margin`` (default 2 %); an op with
nothing kept gets no entry, and a file with no entries is not written (an existing one is removed, so
a rerun that finds the defaults best restores them). Rows with an error, with settings a file cannot
express (``settings`` null) or from another device are ignored.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUNED_DIR = ROOT / "sa2vp_kernels" / "triton" / "tuned"

ATTENTION_BWD = ("bwd_fused_prefix", "bwd_stream")
PROMPT_ADD_BWD = ("bwd_from_z", "bwd_finalize_kernel")


def _usable(rec: dict) -> bool:
    return rec.get("provider") == "triton" and rec.get("settings") is not None and "ms" in rec and "error" not in rec


def _key(settings: dict) -> tuple:
    return tuple(sorted(settings.items()))


def _errors_ok(rec: dict, default: dict) -> bool:
    for name in ("rel_err_out", "rel_err_grad", "rel_err_added", "rel_err_grad_message"):
        if name in rec and name in default:
            if not rec[name] <= 1.5 * default[name] + 1e-3:  # (NaN fails too)
                return False
    return True


def _fastest_forward(records: list[dict], bwd_keys: tuple, margin: float):
    """(settings, default record, chosen record) of the fastest forward among rows without backward keys."""
    fwd = [r for r in records if r["pass"] == "fwd" and not set(r["settings"]) & set(bwd_keys)]
    default = next((r for r in fwd if r["settings"] == {}), None)
    if default is None:
        return {}, None, None
    candidates = [r for r in fwd if _errors_ok(r, default)]
    best = min(candidates, key=lambda r: r["ms"])
    if best["ms"] <= (1 - margin) * default["ms"]:
        return dict(best["settings"]), default, best
    return {}, default, default


def _backward_switches(records: list[dict], keys: tuple, margin: float, pairs_from: str) -> tuple[dict, list]:
    """Backward switches kept: ``pairs_from`` "any" compares every pair of fwd+bwd rows that differ
    only in the key (all must favour it); "default" only the row flipping it alone against the default."""
    both = {_key(r["settings"]): r for r in records if r["pass"] == "fwd+bwd"}
    kept, evidence = {}, []
    for key in keys:
        pairs = []
        for settings_key, rec in both.items():
            settings = dict(settings_key)
            if key not in settings:
                continue
            base = {k: v for k, v in settings.items() if k != key}
            if pairs_from == "default" and base:
                continue
            other = both.get(_key(base))
            if other is not None:
                pairs.append((settings[key], rec, other))
        if pairs and all(rec["ms"] <= (1 - margin) * other["ms"] and _errors_ok(rec, other)
                         for _, rec, other in pairs):
            values = {value for value, _, _ in pairs}
            if len(values) == 1:
                kept[key] = values.pop()
        evidence += [(key, value, rec, other) for value, rec, other in pairs]
    return kept, evidence


def _note(default: dict | None, chosen: dict | None, evidence: list) -> dict:
    note = {}
    if default is not None and chosen is not None:
        note["fwd"] = {"case": default["case"], "default_ms": round(default["ms"], 5),
                       "tuned_ms": round(chosen["ms"], 5), "variant": chosen["variant"]}
    for key, value, rec, other in evidence:
        note.setdefault("fwd+bwd", []).append({"setting": key, "value": value, "ms": round(rec["ms"], 5),
                                                "without_ms": round(other["ms"], 5), "variant": rec["variant"]})
    return note


def choose(results: list[dict], margin: float = 0.02) -> dict:
    """The tuned-settings document (tuning.py's format) from the variants results of one device."""
    meta = results[0]["meta"]
    records = [r for res in results for r in res["records"] if _usable(r)]
    doc = {"format": 1, "device": meta["device"], "torch": meta.get("torch"), "triton": meta.get("triton"),
           "date": meta.get("date"), "source": [res["meta"].get("source") for res in results],
           "local_attention": [], "prompt_add": []}

    # Attention: the cases with a prefix token (the diagnostics without one are left out), per head dim.
    attn = [r for r in records if r["section"] == "attention" and r.get("num_prefix", 1) >= 1]
    dims = sorted({r["head_dim"] for r in attn if r.get("head_dim")})
    for i, dim in enumerate(dims):
        rows = [r for r in attn if r.get("head_dim") == dim]
        settings, default, chosen = _fastest_forward(rows, ATTENTION_BWD, margin)
        bwd, evidence = _backward_switches(rows, ATTENTION_BWD, margin, "any")
        settings.update(bwd)
        if not settings:
            continue
        entry = {}
        if i > 0:
            entry["min_head_dim"] = dims[i - 1] + 1
        if i < len(dims) - 1:
            entry["max_head_dim"] = dim
        entry["settings"] = settings
        entry["measured"] = _note(default, chosen, evidence)
        doc["local_attention"].append(entry)

    # prompt_add: the training case (dropout), the largest such case if there are several.
    pa = [r for r in records if r["section"] == "prompt_add" and r.get("dropout_p", 0) > 0]
    for case in sorted({r["case"] for r in pa})[:1]:
        rows = [r for r in pa if r["case"] == case]
        settings, default, chosen = _fastest_forward(rows, PROMPT_ADD_BWD, margin)
        bwd, evidence = _backward_switches(rows, PROMPT_ADD_BWD, margin, "default")
        settings.update(bwd)
        if settings:
            rank = max(r.get("rank", 0) for r in rows)
            entry = {"max_rank": rank} if rank else {}
            doc["prompt_add"].append({**entry, "settings": settings, "measured": _note(default, chosen, evidence)})
    return doc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results files of bench/gpu_variants.py (one device)")
    parser.add_argument("--out", default=None, help="file to write (default sa2vp_kernels/triton/tuned/<device>.json)")
    parser.add_argument("--copy", default=None, help="folder for a copy of the written file (e.g. the run's logs)")
    parser.add_argument("--margin", type=float, default=0.02, help="least fraction a setting must gain (default 0.02)")
    parser.add_argument("--dry-run", action="store_true", help="print the choice, write nothing")
    args = parser.parse_args(argv)
    if not 0 <= args.margin < 1:
        parser.error(f"--margin must be in [0, 1), got {args.margin}")
    results = []
    for path in args.results:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            parser.error(f"cannot read results file {path}: {exc}")
    devices = {res["meta"]["device"] for res in results}
    if len(devices) != 1:
        parser.error(f"the results files come from different devices: {sorted(devices)}")
    tag = results[0]["meta"]["device_tag"]
    if tag == "cpu" and not args.dry_run and args.out is None:
        parser.error("these results were measured on the CPU (a dry run); pass --out or --dry-run")
    doc = choose(results, args.margin)

    # The document must be one the package accepts.
    sys.path.insert(0, str(ROOT))
    from sa2vp_kernels.triton import tuning

    tuning.parse(doc, "chosen settings")
    text = json.dumps(doc, indent=1) + "\n"
    for op in ("local_attention", "prompt_add"):
        for entry in doc[op]:
            bounds = {k: v for k, v in entry.items() if k not in ("settings", "measured")}
            print(f"{op} {bounds or 'all'}: {entry['settings']}  {json.dumps(entry['measured'])}")
        if not doc[op]:
            print(f"{op}: the built-in defaults (no variant beat them by {100 * args.margin:g} %)")
    if args.dry_run:
        return 0
    out = Path(args.out) if args.out else TUNED_DIR / f"{tag}.json"
    if not doc["local_attention"] and not doc["prompt_add"]:
        if out.exists():
            out.unlink()
            print(f"removed {out}")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out}")
    if args.copy:
        Path(args.copy).mkdir(parents=True, exist_ok=True)
        (Path(args.copy) / out.name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
