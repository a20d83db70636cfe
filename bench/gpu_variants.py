#!/usr/bin/env python3
"""CUDA-graph timings of the kernel variants, side by side, at the benchmark shapes (B=64, 14x14 + CLS,
C=768, bfloat16), on one GPU; for choosing the defaults.

    python3 bench/gpu_variants.py --out DIR                      # writes DIR/<device>-<date>-variants.json
    python3 bench/gpu_variants.py --providers triton,unfused     # no compiled extension needed

Rows:

* local attention forward (1 x 768 and 12 x 64): the CUDA kernels with and without the tiled forward
  (SA2VP_CUDA_ATTN_TILED); the Triton kernels with their default plan and the forward launch plans of
  ``sa2vp_kernels.triton.local_attn.TUNE_PLANS`` (tile rows, warps, pipelining stages), with deeper
  pipelining of the prefix queries' key loop, with the prefix queries fused into the grid tiles
  (``fwd_fused_prefix``, also with other plans; ``bwd_fused_prefix`` the same for the backward's dq),
  with the values loaded early (``fwd_early_v``, one head-dim chunk: 12 x 64), and with each prefix
  query's keys split among programs (``fwd_prefix_splits``), and with the row-streaming forward
  (``fwd_stream``, with its programs per slice, warps, load forms and pipelining depths; head dims up
  to 128, so 12 x 64 only; not in a ``--tiny`` run, too few programs). The defaults, the fused variants
  and the streaming forward also forward + backward; the streaming backward (``bwd_stream``, alone and
  with the streaming forward, and with other warps and programs per slice) forward + backward only.
  Diagnostic: the same layouts without a prefix token (N = 196), to show what the prefix queries cost;
  the device time of each kernel of the main forward variants (torch.profiler, ``kernels`` in their
  records; ``--no-profile`` leaves it out), to show what each launch of a variant costs.
  ``fwd_inline_combine`` (the last program of a split prefix query or slice combines the parts instead
  of a second launch) with the fused tiles, the split prefix keys and the streaming forward.
* prompt_add (p = 0.1) forward and forward + backward: the CUDA kernels with and without the staged
  forward (SA2VP_CUDA_PROMPT_ADD_STAGED) and with the parameter gradients from ATen ops
  (SA2VP_CUDA_PROMPT_ADD_FINALIZE=0); the Triton kernels with their defaults, with the chunked
  rows' statistics in three passes over the message (``fwd_one_pass`` off), with the backward's
  LayerNorm sums from a pass over the message (``bwd_from_z`` off), with the parameter gradients from
  PyTorch ops (``bwd_finalize_kernel`` off) and with the forward launch configurations of
  ``TUNE_CONFIGS``; the unfused nn modules (the baseline). Diagnostic: the same without dropout
  (p = 0), with the error of the added term against a float64 reference.

The Triton rows run with the launch settings they name (sa2vp_kernels.triton.tuning.override; no tuned
file applies), recorded in each record's ``settings``: bench/apply_tuning.py keeps the fastest as the
GPU model's tuned file. The attention rows report the error of the output against the float64
reference (bench/common.py); every row the share of the measured copy bandwidth for the fewest bytes
the op must move. A variant that fails is recorded with its error and the others still run; the
results file is rewritten after each row.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_TLA = "sa2vp_kernels.triton.local_attn"
_TPA = "sa2vp_kernels.triton.prompt_add"


def _attention_variants():
    """(label, provider, environment, patches, settings): patches are (module, attribute, value) set for
    the row and restored after it; settings are the Triton launch settings of the row
    (sa2vp_kernels.triton.tuning.override: the same keys as a tuned file, so bench/apply_tuning.py
    can keep the fastest), None for the CUDA rows."""
    from sa2vp_kernels.triton import local_attn as tla

    rows = [
        ("cuda default", "cuda", {"SA2VP_CUDA_ATTN_TILED": "0"}, (), None),
        ("cuda tiled", "cuda", {"SA2VP_CUDA_ATTN_TILED": "1"}, (), None),
        ("triton", "triton", {}, (), {}),
        ("triton prefix st3", "triton", {}, ((_TLA, "_PREFIX_STAGES", 3),), {}),
    ]
    for settings in (*tla.TUNE_SETTINGS, {"fwd_fused_prefix": True, "bwd_fused_prefix": True},
                     {"bwd_fused_prefix": True}, {"bwd_stream": True}, {"fwd_stream": True, "bwd_stream": True}):
        rows.append(("triton " + tla.settings_label(settings), "triton", {}, (), settings))
    # the streaming backward's warps and programs per slice (diagnostics: a tuned file cannot set them)
    for attr, value, label in (("_BWD_STREAM_NUM_WARPS", 2, "w2"), ("_BWD_STREAM_NUM_WARPS", 8, "w8"),
                               ("_BWD_STREAM_SEGMENTS", 1, "seg1"), ("_BWD_STREAM_SEGMENTS", 4, "seg4")):
        rows.append((f"triton bwd stream {label}", "triton", {}, ((_TLA, attr, value),), {"bwd_stream": True}))
    return rows


# Attention variants also timed forward + backward (the others: forward only).
_ATTENTION_FWD_BWD = ("cuda default", "triton", "triton fused", "triton fused fwd+dq", "triton dq fused",
                      "triton stream")


# Forward rows whose kernels are also profiled (torch.profiler, eager calls): the device time of each
# kernel (the main launch, the combine of the prefix queries' parts, the counters' memset), to show what
# a variant's second launch costs against its main one.
_PROFILED = ("triton", "triton fused", "triton fused inline", "triton split8", "triton split8 inline",
             "triton stream", "triton stream inline")


def _attention_passes(label: str) -> tuple:
    """The passes timed for an attention variant: the streaming backward's rows forward + backward only."""
    if "bwd stream" in label:
        return ("fwd+bwd",)
    return ("fwd", "fwd+bwd") if label in _ATTENTION_FWD_BWD else ("fwd",)


def _prompt_add_variants():
    rows = [
        ("cuda not staged", "cuda", {"SA2VP_CUDA_PROMPT_ADD_STAGED": "0"}, (), None),
        ("cuda staged", "cuda", {"SA2VP_CUDA_PROMPT_ADD_STAGED": "1"}, (), None),  # the default
        ("cuda aten-sums", "cuda", {"SA2VP_CUDA_PROMPT_ADD_FINALIZE": "0"}, (), None),
        ("triton", "triton", {}, (), {}),
        ("triton 3-pass", "triton", {}, (), {"fwd_one_pass": False}),
        ("triton bwd-msg", "triton", {}, (), {"bwd_from_z": False}),
        ("triton torch-sums", "triton", {}, (), {"bwd_finalize_kernel": False}),
    ]
    import torch

    from sa2vp_kernels.triton import prompt_add as tpa
    default = tpa._row_blocks(768, 16, torch.bfloat16)
    for cfg in tpa.TUNE_CONFIGS:
        settings = {k: v for k, v in zip(("block_m", "num_warps", "block_c"), cfg) if v}
        if tpa._fwd_row_blocks(settings, 768, 16, torch.bfloat16, torch.device("cpu")) == default:
            continue  # (the default at the benchmark shape: the "triton" row)
        label = "triton " + " ".join(f"{k}{'-all' if v == -1 else v}" for k, v in zip(("m", "w", "c"), cfg) if v)
        rows.append((label, "triton", {}, (), settings))
    rows.append(("unfused", "unfused", {}, (), None))  # nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout and adds
    return rows


@contextlib.contextmanager
def _patched(patches):
    saved = []
    try:
        for module_name, attr, value in patches:
            mod = importlib.import_module(module_name)
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, value(mod) if callable(value) else value)
        yield
    finally:
        for mod, attr, old in reversed(saved):
            setattr(mod, attr, old)


def _prompt_add_delta_errors(work, case) -> dict:
    """Relative errors, against the float64 reference without dropout, of the term added to the target
    (``out - target``) and of the message gradient, on input set 0 (kernel backends only)."""
    import torch

    from sa2vp_kernels.reference.prompt_add import prompt_add_reference

    import common

    args = work.args[0]
    if case.dropout_p > 0 or len(args) < 8:
        return {}
    target, message, *params = args
    out = work.forward(*args)
    go = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(5), device=out.device)
    (g_msg,) = torch.autograd.grad(out, message, go.to(out.dtype))
    t64, m64 = target.detach().double(), message.detach().double().requires_grad_(True)
    ref = prompt_add_reference(t64, m64, case.scale, *[p.detach().double() for p in params], None, None, 0.0,
                               1e-6, None)
    (g_ref,) = torch.autograd.grad(ref, m64, go.double())
    return {"rel_err_added": common.rel_err(out.detach().double() - t64, (ref - t64).detach()),
            "rel_err_grad_message": common.rel_err(g_msg, g_ref)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder of the results file (default bench/results)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a dry run, also on the CPU)")
    parser.add_argument("--providers", default="cuda,triton,unfused",
                        help="comma-separated providers to time (default: cuda,triton,unfused)")
    parser.add_argument("--tag", default="", help="suffix of the results file name (e.g. triton)")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not profile the kernels of the main forward variants (torch.profiler)")
    parser.add_argument("--quick", action="store_true",
                        help="a few rows per op (the defaults, a fused attention, the fused dq, a prompt_add "
                             "configuration, a backward switch, the unfused modules); no sweeps, no diagnostics")
    args = parser.parse_args(argv)
    if not os.path.exists("/dev/nvidia0"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["SA2VP_TRITON_TUNED"] = "0"  # the rows time the built-in defaults and the settings they name
    import torch

    import common
    from sa2vp_kernels.triton import tuning

    providers = {p.strip() for p in args.providers.split(",") if p.strip()}
    profile = not args.no_profile
    unknown = providers - {"cuda", "triton", "unfused"}
    if unknown:
        parser.error(f"--providers: unknown {sorted(unknown)}; choose from cuda, triton, unfused")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device; use --tiny for a dry run", file=sys.stderr)
        return 2
    batch, dtype = (64, torch.bfloat16) if not args.tiny else (2, torch.float32)
    layouts = ((1, 768), (12, 64)) if not args.tiny else ((1, 32), (4, 8))
    grid = (14, 14) if not args.tiny else (4, 5)
    B, N, C, r = (64, 197, 768, 16) if not args.tiny else (2, 21, 32, 4)
    results = common.new_results(device, source="bench/gpu_variants.py" + (" --tiny" if args.tiny else ""))
    results["meta"]["providers"] = sorted(providers)
    out = Path(args.out or common.RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = out / f"{results['meta']['device_tag']}-{results['meta']['date']}-variants{tag}.json"
    copy = common.copy_bandwidth(device, (1 << 30) if not args.tiny else (16 << 20))
    results["bandwidth"] = copy
    print(f"{results['meta']['device']}: copy bandwidth {copy['gbps']:.0f} GB/s", flush=True)

    def timed(fn):
        if device.type == "cuda":
            return common.time_cuda_graph(fn, device, rep_ms=10)["ms_graph"]
        return common.time_fn(fn, device, warmup_ms=1, rep_ms=5)["ms"]

    def row(section, case, label, provider, env, patches, settings, passes, make, errors):
        if provider not in providers:
            return
        op_settings = {section.replace("attention", "local_attention"): settings or {}}
        try:
            # (the extension reads the variant switches at every launch; the Triton launchers read the
            # patched module attributes and the settings at every call)
            with common.environment(**env), _patched(patches), tuning.override(**op_settings):
                work = make(provider, case)
                err = errors(work, case) if errors else {}
                for pass_ in passes:
                    rec = {"section": section, "case": case.label, "variant": label, "provider": provider,
                           "pass": pass_, "settings": settings if not patches else None,
                           **{k: getattr(case, k) for k in ("head_dim", "num_prefix", "width", "rank",
                                                             "dropout_p") if hasattr(case, k)}, **err}
                    try:
                        rec["ms"] = timed(work.runner(pass_))
                        rec["bytes"] = case.bytes(pass_)
                        rec["bw_frac"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9 / copy["gbps"]
                        if profile and label in _PROFILED and pass_ == "fwd" and section == "attention":
                            prof = common.profile_kernels(work.runner(pass_), device,
                                                          iters=20 if device.type == "cuda" else 1)
                            rec["kernels"] = [[name[:80], calls, ms] for name, calls, ms in prof["kernels"]]
                    except Exception as exc:  # a variant that fails is recorded, the others still run
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    results["records"].append(rec)
                    msg = (f"{rec['ms']:.4f} ms {100 * rec['bw_frac']:5.1f}% of copy bw" if "ms" in rec
                           else rec["error"])
                    errs = "".join(f"  {k.replace('rel_err_', 'err ')} {v:.1e}" for k, v in err.items())
                    print(f"{section:<10} {case.label:<36} {label:<20} {pass_:<8} {msg}{errs}", flush=True)
                    for name, calls, ms in rec.get("kernels", ()):
                        print(f"{'':<10} {'':<36} {'':<20} kernel   {ms:.4f} ms x{calls} {name}", flush=True)
                del work
        except Exception as exc:
            results["records"].append({"section": section, "case": case.label, "variant": label,
                                       "provider": provider, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(f"{section:<10} {case.label:<36} {label:<20} ERROR {exc}", flush=True)
        finally:
            common.write_results(results, [path])

    def attention(case, variants):
        from sa2vp_kernels.triton import local_attn as tla

        for label, provider, env, patches, settings in variants:
            shape = (case.batch * case.heads, *case.grid, case.window, case.num_prefix, case.head_dim)
            if ((settings or {}).get("fwd_stream") and not tla.stream_applies(settings, *shape)) or \
                    ((settings or {}).get("bwd_stream") and not tla._bwd_stream_fits(*shape)):
                continue  # (the call would run the default: the "triton" row)
            passes = _attention_passes(label)
            row("attention", case, label, provider, env, patches, settings, passes,
                lambda p, c: common.attention_workload(p, c, device,
                                                       n_sets=common.rotation(3 * c.tensor_bytes(), device)),
                common.attention_errors)

    def prompt_add(case, variants, errors=None):
        for label, provider, env, patches, settings in variants:
            row("prompt_add", case, label, provider, env, patches, settings, ("fwd", "fwd+bwd"),
                lambda p, c: common.prompt_add_workload(p, c, device, n_sets=2), errors)

    # In order of need (a run cut short keeps the first rows): the defaults and the structural variants of
    # both ops, then the launch-plan sweeps, then the diagnostics.
    attn_variants = _attention_variants()
    pa_variants = _prompt_add_variants()
    if args.quick:
        attn_variants = [v for v in attn_variants
                         if v[0] in ("cuda default", "triton", "triton fused", "triton fused fwd+dq", "triton stream")]
        pa_variants = [v for v in pa_variants if v[0] in ("cuda staged", "triton", "triton m32 w8 c128",
                                                           "triton torch-sums", "unfused")]
    first = [v for v in attn_variants
             if v[1] == "cuda" or v[0] in ("triton", "triton split8")
             or any(w in v[0] for w in ("fused", "early", "stream", "inline"))]
    attn_cases = [common.AttnCase(batch, heads, dim, grid=grid, window=3, border="clip", dtype=dtype)
                  for heads, dim in layouts]
    for case in attn_cases:
        attention(case, first)
    prompt_add(common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=0.1, dtype=dtype), pa_variants)
    for case in attn_cases:
        attention(case, [v for v in attn_variants if v not in first])
    if args.quick:
        common.write_results(results, [path])
        print(f"results: {path}")
        return 0
    # Diagnostics: the cost of the prefix queries and of dropout.
    for heads, dim in layouts:
        attention(common.AttnCase(batch, heads, dim, grid=grid, window=3, num_prefix=0, border="clip", dtype=dtype),
                  [v for v in attn_variants if v[0] in ("cuda default", "triton", "triton w4", "triton stream")])
    prompt_add(common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=0.0, dtype=dtype),
               [v for v in pa_variants if v[0] in ("cuda staged", "triton", "triton 3-pass", "unfused")],
               lambda work, case: _prompt_add_delta_errors(work, case))
    common.write_results(results, [path])
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
