#!/usr/bin/env python3
"""Time every op of sa2vp-kernels and the SA2VP model against the alternatives on one GPU, within a
time budget, and write a device-tagged results file.

    python3 bench/run_gpu.py --out DIR --budget 300      # on a CUDA machine (bench/gpu_check.sh)
    python3 bench/run_gpu.py --dry-run --out /tmp/dry    # every code path, tiny shapes, on the CPU

Sections, in this order: copy bandwidth; attention (B=64, N=197, C=768 as 1x768 and 12x64, bf16;
fwd / bwd / fwd+bwd; our Triton and CUDA kernels, the vectorised reference, dense SDPA with a
neighbourhood mask, FlexAttention with a block mask, NATTEN); prompt_add (fwd, fwd+bwd; kernels,
reference, the unfused nn composition, eager and compiled); prompt_map; the kernels of one fwd+bwd
call per fused op (torch.profiler, "profile"); CUDA-graph timings of the fast measurements ("graphs");
kernel variants around the defaults ("tune": CUDA attention with and without prefetching, CUDA
prompt_add forward with and without staged weights, Triton launch configurations); the SA2VP ViT-B/16
training step and inference at 224 (auto backend against backend="reference") and the Swin-B one; N
scaling 197 -> 785 -> 4097 with peak memory; windows 3/5/7; last, the model at 448.

Each section gets a share of the time left when it starts and skips its remaining items once over
it; the results file is rewritten after every measurement, so a run cut short still leaves data.
A failing provider records its error and the run goes on.  Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls) over rotating input sets and of
CUDA-graph replays of many unrolled calls over the same sets (``ms_graph``: neither the host's launch
overhead nor the write-back of the dirty L2 lines the flush leaves behind).
``--no-graphs`` leaves the graph timings out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Plan:
    """Shapes and repetition counts of one run."""

    batch: int = 64
    dtype_name: str = "bfloat16"
    layouts: tuple = ((12, 64), (1, 768))
    zero_border_layouts: tuple = ((1, 768),)  # the authors' accelerated variant: 1 head, zero border
    grid: tuple = (14, 14)
    windows: tuple = (3, 5, 7)
    scaling_grids: tuple = ((14, 14), (28, 28), (64, 64))
    prompt_add: tuple = ((64, 197, 768, 16),)
    dropout_ps: tuple = (0.1, 0.0)
    prompt_map: tuple = (((14, 14), (14, 14)), ((28, 28), (14, 14)))
    prompt_map_dtype_name: str = "float32"
    model: str = "vit_base_patch16_224"
    num_classes: int = 100
    e2e_first: tuple = ((224, 64),)
    e2e_last: tuple = ((448, 16),)
    swin_model: str = "swin_base_patch4_window7_224"
    e2e_swin: tuple = ((224, 64),)
    infer_batch: int = 64
    warm_steps: int = 3
    train_steps: int = 10
    warmup_ms: float = 25
    rep_ms: float = 60
    graph_rep_ms: float = 10  # CUDA-graph timing as well (0: eager timing only) ...
    graph_below_ms: float = 5  # ... of calls fast enough for the host's launch overhead to matter
    copy_bytes: int = 1 << 30
    # Sweeps of the last section, each compiling without spills for sm_90 at the benchmark shapes
    # (python -m sa2vp_kernels.triton.aot): prompt_add (BLOCK_M, num_warps, BLOCK_C: the Triton
    # module's TUNE_CONFIGS, None); the tiled attention forward (num_warps, head-dim chunk BLOCK_DC);
    # 0 = the default's value.
    tune_prompt_add: tuple | None = None
    tune_attention: tuple = ((0, 0), (2, 0), (4, 0), (8, 0), (2, 32), (4, 32), (4, 128))
    shares: dict = field(default_factory=lambda: {
        "attention": 0.3, "prompt_add": 0.2, "prompt_map": 0.1, "end_to_end": 0.3, "profile": 0.15,
        "graphs": 0.3, "tune": 0.35,
        "end_to_end_swin": 0.3, "scaling": 0.4, "windows": 0.5, "end_to_end_large": 1.0})

    @classmethod
    def tiny(cls) -> "Plan":
        return cls(batch=2, dtype_name="float32", layouts=((4, 8), (1, 32)), zero_border_layouts=((1, 32),),
                   grid=(4, 5), windows=(3, 5),
                   scaling_grids=((4, 5), (8, 9)), prompt_add=((2, 21, 32, 4),),
                   prompt_map=(((4, 5), (4, 5)), ((8, 10), (4, 5))), model="vit_tiny_patch16_224",
                   num_classes=10, e2e_first=((48, 2),), e2e_last=((64, 2),), infer_batch=2, warm_steps=1,
                   swin_model="swin_tiny_patch4_window7_224", e2e_swin=((224, 1),),
                   train_steps=2, warmup_ms=1, rep_ms=5, copy_bytes=16 << 20,
                   tune_prompt_add=((16, 4, 0), (16, 4, 16)))


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Run:
    """Budget, results and the file they are flushed to."""

    def __init__(self, args, plan: Plan):
        import common

        self.common = common
        self.args, self.plan = args, plan
        self.device = common.torch.device(args.device)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.section_deadline = self.deadline
        self.results = common.new_results(self.device, source="bench/run_gpu.py" + (" --tiny" if args.tiny else ""))
        self.results["meta"]["plan"] = {k: v for k, v in vars(plan).items() if k != "shares"}
        self.results["meta"]["budget_s"] = args.budget
        tag = self.results["meta"]["device_tag"] + ("-tiny" if args.tiny else "")
        self.results["meta"]["device_tag"] = tag
        name = f"{tag}-{self.results['meta']['date']}.json"
        self.paths = [Path(args.out) / name]
        if not args.no_copy:
            self.paths.append(common.RESULTS_DIR / name)
        self.copy_gbps = None
        self.cuda = self.device.type == "cuda"
        self.alive = True
        self.graph_jobs: dict = {}  # (section, case, provider) -> (make, eager records to add graph times to)

    # -- budget ---------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def begin(self, section: str) -> bool:
        share = self.plan.shares.get(section, 1.0)
        now = time.monotonic()
        self.section_deadline = now + share * max(self.deadline - now, 0.0)
        self.log(f"== {section} ({self.section_deadline - now:.0f} s of {self.left():.0f} s left)")
        return self.alive and self.left() > 0

    def over(self) -> bool:
        return not self.alive or time.monotonic() > self.section_deadline

    def skip(self, section: str, what: str, reason: str) -> None:
        self.results["skipped"].append({"section": section, "what": what, "reason": reason})
        self.log(f"   skip {what}: {reason}")

    # -- results --------------------------------------------------------------------------------
    def add(self, record: dict) -> None:
        self.results["records"].append(record)
        self.flush()
        msg = f"   {record['provider']:<17} {record['pass']:<8} {record['case']:<38}"
        if record.get("error"):
            msg += f" ERROR {record['error'][:160]}"
        else:
            msg += f" {record['ms']:9.4f} ms"
            if record.get("bw_frac") is not None:
                msg += f"  {100 * record['bw_frac']:5.1f}% of copy bw"
            if record.get("images_per_s") is not None:
                msg += f"  {record['images_per_s']:8.1f} img/s"
            if record.get("peak_mib") is not None:
                msg += f"  peak {record['peak_mib']:8.0f} MiB"
            if record.get("rel_err_out") is not None:
                msg += f"  err {record['rel_err_out']:.1e}"
        self.log(msg)

    def flush(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        self.common.write_results(self.results, self.paths)

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    # -- helpers --------------------------------------------------------------------------------
    def check_alive(self) -> None:
        """After an error on the GPU: stop the run if the CUDA context is gone (a sticky error)."""
        if not self.cuda:
            return
        torch = self.common.torch
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
        except RuntimeError as exc:
            self.alive = False
            self.results["errors"]["cuda_context"] = _short(exc)
            self.log(f"   the CUDA context is unusable ({_short(exc)}); stopping")

    def free(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            self.common.torch.cuda.empty_cache()

    def measure(self, section: str, case, provider: str, make, passes, *, errors=None, memory=False) -> None:
        """Time ``passes`` of the workload ``make()`` builds, with its errors and peak memory."""
        common = self.common
        if self.args.providers and provider not in self.args.providers:
            return
        base = {"section": section, "case": case.label, "provider": provider, **case.params()}
        try:
            work = make()
        except common.Unavailable as exc:
            self.skip(section, f"{provider} {case.label}", str(exc))
            return
        except Exception as exc:  # a provider that breaks is recorded, the run goes on
            self.add({**base, "pass": passes[0], "error": _short(exc)})
            self.check_alive()
            return
        extra = {"note": work.note} if work.note else {}
        if errors is not None:
            try:
                extra.update(errors(work))
            except Exception as exc:
                extra["check_error"] = _short(exc)
                self.check_alive()
        broken = None  # the forward itself fails: record its error for every pass without retrying
        for pass_ in passes:
            if self.over():
                self.skip(section, f"{provider} {case.label} {pass_}", "over the section's time budget")
                continue
            rec = {**base, "pass": pass_, **extra}
            if broken is not None:
                self.add({**rec, "error": broken})
                continue
            try:
                fn = work.runner(pass_)
                rec.update(common.time_fn(fn, self.device, warmup_ms=self.plan.warmup_ms, rep_ms=self.plan.rep_ms))
                nbytes = case.bytes(pass_)
                rec["bytes"] = nbytes
                rec["gbps"] = nbytes / (rec["ms"] * 1e-3) / 1e9
                if self.copy_gbps:
                    rec["bw_frac"] = rec["gbps"] / self.copy_gbps
                if memory:
                    rec.update(common.peak_memory_mib(fn, self.device))
                del fn
                # CUDA-graph timings come last (section "graphs"): a failed capture can leave the CUDA
                # context unusable, which must not cost the eager results.  Not for "bwd": its forward
                # ran outside the capture, and autograd runs each backward kernel on its forward's stream.
                if (self.cuda and self.plan.graph_rep_ms and rec["ms"] < self.plan.graph_below_ms
                        and pass_ != "bwd"):
                    self.graph_jobs.setdefault((section, case.label, provider), (make, []))[1].append(rec)
            except common.Unavailable as exc:
                self.skip(section, f"{provider} {case.label} {pass_}", str(exc))
                continue
            except Exception as exc:
                rec["error"] = _short(exc)
                if rec["error"] == extra.get("check_error"):
                    broken = rec["error"]
                self.free()
                self.check_alive()
            self.add(rec)
            if not self.alive:
                break
        del work
        self.free()


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------

def attention_providers(run: Run, section: str) -> tuple:
    common = run.common
    kernels = common.kernel_backends(run.device)
    if (section == "attention" and run.device.type == "cpu"
            and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        kernels = ("triton",) + kernels  # the interpreter: checked once, far too slow to time further
    # FlexAttention last: its compilation is the slowest item of a section.
    return kernels + ("reference", "sdpa_masked", "natten", "flex")


def section_bandwidth(run: Run) -> None:
    bw = run.common.copy_bandwidth(run.device, run.plan.copy_bytes)
    run.copy_gbps = bw["gbps"]
    run.results["bandwidth"] = bw
    run.flush()
    run.log(f"   device-to-device copy: {bw['gbps']:.0f} GB/s (read + write, {bw['bytes'] / 1e9:.2f} GB moved)")


def _attn_case(run: Run, heads: int, head_dim: int, grid, window: int = 3, border: str = "clip"):
    return run.common.AttnCase(run.plan.batch, heads, head_dim, grid=tuple(grid), window=window, border=border,
                               dtype=getattr(run.common.torch, run.plan.dtype_name))


def _attn_make(run: Run, provider: str, case):
    common = run.common

    def make():
        n_sets = common.rotation(3 * case.tensor_bytes(), run.device)
        return common.attention_workload(provider, case, run.device, n_sets=n_sets,
                                         compile_flex=run.device.type == "cuda")

    return make


def _attn_errors(run: Run, provider: str, case):
    if provider == "natten":
        return None
    return lambda work: run.common.attention_errors(work, case)


def section_attention(run: Run) -> None:
    cases = [(layout, "clip") for layout in run.plan.layouts]
    cases += [(layout, "zero") for layout in run.plan.zero_border_layouts]
    for provider in attention_providers(run, "attention"):
        for (heads, head_dim), border in cases:
            case = _attn_case(run, heads, head_dim, run.plan.grid, border=border)
            run.measure("attention", case, provider, _attn_make(run, provider, case), run.common.PASSES,
                        errors=_attn_errors(run, provider, case), memory=True)


def section_windows(run: Run) -> None:
    for window in run.plan.windows:
        for provider in attention_providers(run, "windows"):
            case = _attn_case(run, *run.plan.layouts[0], run.plan.grid, window)
            run.measure("windows", case, provider, _attn_make(run, provider, case), ("fwd", "fwd+bwd"),
                        errors=_attn_errors(run, provider, case) if window != 3 else None)


def section_scaling(run: Run) -> None:
    for grid in run.plan.scaling_grids:
        for provider in attention_providers(run, "scaling"):
            case = _attn_case(run, *run.plan.layouts[0], grid)
            run.measure("scaling", case, provider, _attn_make(run, provider, case), ("fwd", "fwd+bwd"),
                        memory=True)


def section_prompt_add(run: Run) -> None:
    common = run.common
    dtype = getattr(common.torch, run.plan.dtype_name)
    providers = common.kernel_backends(run.device) + ("reference", "unfused")
    if run.device.type == "cuda":
        providers += ("unfused_compiled",)
    for p in run.plan.dropout_ps:
        for B, N, C, r in run.plan.prompt_add:
            case = common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=p, dtype=dtype)
            for provider in providers:
                def make(provider=provider, case=case):
                    n_sets = common.rotation(2 * case.tensor_bytes(), run.device)
                    return common.prompt_add_workload(provider, case, run.device, n_sets=n_sets)

                run.measure("prompt_add", case, provider, make, ("fwd", "fwd+bwd"),
                            errors=lambda work, case=case: common.prompt_add_errors(work, case, run.device))


def section_prompt_map(run: Run) -> None:
    common = run.common
    dtype = getattr(common.torch, run.plan.prompt_map_dtype_name)
    providers = common.kernel_backends(run.device) + ("reference",)
    for grid, embed_grid in run.plan.prompt_map:
        case = common.PromptMapCase(grid=tuple(grid), embed_grid=tuple(embed_grid), width=run.plan.prompt_add[0][2],
                                    rank=run.plan.prompt_add[0][3], dtype=dtype)
        ref_out = {}
        for provider in ("reference",) + tuple(p for p in providers if p != "reference"):
            def make(provider=provider, case=case):
                return common.prompt_map_workload(provider, case, run.device, n_sets=4)

            def errors(work, provider=provider):
                out = work.forward(*work.args[0])
                if provider == "reference":
                    ref_out["out"] = out.detach().double()
                    return {}
                return {"rel_err_out": common.rel_err(out, ref_out["out"])} if "out" in ref_out else {}

            run.measure("prompt_map", case, provider, make, common.PASSES, errors=errors)


@dataclass(frozen=True)
class ModelCase:
    model: str
    img_size: int
    batch: int
    mode: str
    dtype_name: str

    @property
    def label(self) -> str:
        return f"{self.model} img{self.img_size} B{self.batch} {self.dtype_name} {self.mode}"

    def params(self) -> dict:
        return {"model": self.model, "img_size": self.img_size, "B": self.batch, "dtype": self.dtype_name}


def _time_steps(run: Run, step, warm: int, steps: int) -> float:
    """Mean milliseconds per call of ``step`` over ``steps`` calls after ``warm`` warm-up calls."""
    torch = run.common.torch
    for _ in range(warm):
        step()
    run.common.synchronize(run.device)
    if run.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) * 1e3 / steps


def _model_backends(run: Run) -> tuple:
    from sa2vp_kernels._dispatch import resolve_backend

    auto = resolve_backend("auto", run.device, "local_attn_fwd")
    run.results["meta"]["auto_backend"] = auto
    extra = ("triton",) if auto == "cuda" else ()
    return ("auto", "reference") + extra


def _build_model(name: str, num_classes: int, backend: str, img_size: int):
    """SA2VP on the timm ViT or Swin backbone ``name`` (random weights: timing only)."""
    from sa2vp import SA2VP, SA2VPConfig, SA2VPSwin, SA2VPSwinConfig, is_swin_backbone

    if is_swin_backbone(name):
        return SA2VPSwin(name, num_classes, SA2VPSwinConfig(backend=backend), img_size=img_size)
    return SA2VP(name, num_classes=num_classes, config=SA2VPConfig(backend=backend), img_size=img_size)


def section_end_to_end(run: Run, sizes, model_name: str | None = None) -> None:
    torch = run.common.torch
    try:
        import sa2vp  # noqa: F401
    except ImportError as exc:
        run.skip("end_to_end", "SA2VP", f"sa2vp is not importable ({exc})")
        return
    plan = run.plan
    model_name = model_name or plan.model
    dtype_name = plan.dtype_name if run.cuda else "float32"
    for img_size, batch in sizes:
        for backend in _model_backends(run):
            if run.over():
                run.skip("end_to_end", f"{backend} img{img_size}", "over the section's time budget")
                continue
            train_case = ModelCase(model_name, img_size, batch, "train", dtype_name)
            infer_case = ModelCase(model_name, img_size, plan.infer_batch if img_size == sizes[0][0] else batch,
                                   "infer", dtype_name)
            model = None
            try:
                model = _build_model(model_name, plan.num_classes, backend, img_size).to(run.device)
            except Exception as exc:
                run.add({"section": "end_to_end", "case": train_case.label, "provider": backend, "pass": "train",
                         **train_case.params(), "error": _short(exc)})
                run.check_alive()
                continue
            for case in (train_case, infer_case):
                if run.over():
                    run.skip("end_to_end", f"{backend} {case.label}", "over the section's time budget")
                    continue
                rec = {"section": "end_to_end", "case": case.label, "provider": backend, "pass": case.mode,
                       **case.params()}
                try:
                    step = _train_step(run, model, case) if case.mode == "train" else _infer_step(run, model, case)
                    if run.cuda:
                        torch.cuda.synchronize(run.device)
                        torch.cuda.reset_peak_memory_stats(run.device)
                    ms = _time_steps(run, step, plan.warm_steps, plan.train_steps)
                    rec.update(ms=ms, images_per_s=case.batch / (ms * 1e-3))
                    if run.cuda:
                        rec["peak_mib"] = torch.cuda.max_memory_allocated(run.device) / 2**20
                    del step
                except Exception as exc:
                    rec["error"] = _short(exc)
                    if os.environ.get("SA2VP_BENCH_TRACEBACK"):
                        traceback.print_exc()
                    run.free()
                    run.check_alive()
                run.add(rec)
            del model
            run.free()


def _train_step(run: Run, model, case: ModelCase):
    torch = run.common.torch
    model.train()
    params = [p for _, p in model.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    g = torch.Generator(device=run.device).manual_seed(0)
    images = torch.randn(case.batch, 3, case.img_size, case.img_size, device=run.device, generator=g)
    target = torch.randint(0, model.num_classes, (case.batch,), device=run.device, generator=g)

    def step():
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cuda):
            loss = model.loss(model(images), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _infer_step(run: Run, model, case: ModelCase):
    torch = run.common.torch
    model.eval()
    g = torch.Generator(device=run.device).manual_seed(1)
    images = torch.randn(case.batch, 3, case.img_size, case.img_size, device=run.device, generator=g)

    def step():
        with torch.no_grad(), torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.cuda):
            return model(images)

    return step


def section_graphs(run: Run) -> None:
    """CUDA-graph timings of the fast eager measurements (host launch overhead left out)."""
    common = run.common
    if not run.cuda or not run.plan.graph_rep_ms:
        run.skip("graphs", "graphs", "CUDA graphs need a GPU" if not run.cuda else "disabled")
        return
    for (section, label, provider), (make, records) in run.graph_jobs.items():
        if run.over():
            run.skip("graphs", f"{section} {provider} {label}", "over the section's time budget")
            continue
        try:
            work = make()
        except Exception as exc:
            for rec in records:
                rec["graph_error"] = _short(exc, 200)
            run.check_alive()
            continue
        for rec in records:
            try:
                fn = work.runner(rec["pass"])
                rec.update(common.time_cuda_graph(fn, run.device, rep_ms=run.plan.graph_rep_ms))
                if run.copy_gbps:
                    rec["bw_frac_graph"] = rec["bytes"] / (rec["ms_graph"] * 1e-3) / 1e9 / run.copy_gbps
                del fn
                msg = f"{rec['ms_graph']:9.4f} ms" + (f"  {100 * rec['bw_frac_graph']:5.1f}% of copy bw"
                                                       if run.copy_gbps else "")
            except Exception as exc:
                rec["graph_error"] = msg = _short(exc, 200)
                run.free()
                run.check_alive()
            run.flush()
            run.log(f"   {provider:<17} {rec['pass']:<8} {section} {label:<38} graph {msg}")
            if not run.alive:
                return
        del work
        run.free()


def section_profile(run: Run) -> None:
    """Kernels of one fwd+bwd call, by device time (torch.profiler): where the time of each fused op goes,
    and how much of an eager call is not kernel time at all (host launch overhead, gaps)."""
    common = run.common
    torch = common.torch
    dtype = getattr(torch, run.plan.dtype_name)
    B, N, C, r = run.plan.prompt_add[0]
    jobs = []
    for provider in common.kernel_backends(run.device) + ("unfused",):
        case = common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=run.plan.dropout_ps[-1], dtype=dtype)
        jobs.append(("prompt_add", case, provider,
                     lambda provider=provider, case=case: common.prompt_add_workload(provider, case, run.device)))
    for provider in common.kernel_backends(run.device):
        case = _attn_case(run, *run.plan.layouts[0], run.plan.grid)
        jobs.append(("attention", case, provider, _attn_make(run, provider, case)))
    run.results.setdefault("profile", [])
    for section, case, provider, make in jobs:
        if run.args.providers and provider not in run.args.providers:
            continue
        if run.over():
            run.skip("profile", f"{section} {provider} {case.label}", "over the section's time budget")
            continue
        rec = {"section": section, "case": case.label, "provider": provider, "pass": "fwd+bwd"}
        try:
            fn = make().runner("fwd+bwd")
            iters = 10
            rec.update(common.profile_kernels(fn, run.device, iters=iters))
        except Exception as exc:
            rec["error"] = _short(exc)
            run.check_alive()
        run.results["profile"].append(rec)
        run.flush()
        if rec.get("error"):
            run.log(f"   {provider:<17} {section} {case.label}: ERROR {rec['error'][:160]}")
        else:
            run.log(f"   {provider:<17} {section} {case.label}: {rec['kernel_ms']:.4f} ms of kernels in "
                    f"{rec['wall_ms']:.4f} ms per call")
            for name, calls, ms in rec["kernels"][:8]:
                run.log(f"      {ms:8.4f} ms  {calls:3d}x  {name[:110]}")
        if not run.alive:
            return
        run.free()


def _time_tuned(run: Run, section: str, case, provider: str, make, pass_: str = "fwd") -> None:
    """One configuration of a sweep: CUDA-graph time on a GPU (launch overhead left out), else eager."""
    common = run.common
    rec = {"section": section, "case": case.label, "provider": provider, "pass": pass_, **case.params()}
    try:
        work = make()
        fn = work.runner(pass_)
        if run.cuda:
            timing = common.time_cuda_graph(fn, run.device, rep_ms=max(run.plan.graph_rep_ms, 5))
            rec.update(ms=timing["ms_graph"], ms_min=timing["ms_graph_min"], timing="cuda-graph")
        else:
            rec.update(common.time_fn(fn, run.device, warmup_ms=run.plan.warmup_ms, rep_ms=run.plan.rep_ms))
        rec["bytes"] = case.bytes(pass_)
        rec["gbps"] = rec["bytes"] / (rec["ms"] * 1e-3) / 1e9
        if run.copy_gbps:
            rec["bw_frac"] = rec["gbps"] / run.copy_gbps
        del fn, work
    except Exception as exc:
        rec["error"] = _short(exc)
        run.check_alive()
    run.free()
    run.add(rec)


_PREFETCH_ENV = "SA2VP_CUDA_ATTN_PREFETCH"
_STAGED_ENV = "SA2VP_CUDA_PROMPT_ADD_STAGED"


def section_tune(run: Run) -> None:
    """Timings of kernel variants around the defaults, for tuning them on this card: the CUDA attention
    with and without prefetching (forward and forward + backward), the CUDA prompt_add forward with and
    without its weights staged in shared memory, the Triton prompt_add's launch
    configurations (BLOCK_M, num_warps, channel chunk; forward and forward + backward) and the tiled
    Triton attention's (num_warps, head-dim chunk; forward), around the built-in defaults (no tuned
    file applies). The defaults are labelled "default"."""
    common = run.common
    if "cuda" in common.kernel_backends(run.device):
        # The CUDA attention kernels with and without loading the next key's rows ahead
        # (SA2VP_CUDA_ATTN_PREFETCH, read at every launch), forward and forward + backward.
        for heads, dim in run.plan.layouts:
            acase = _attn_case(run, heads, dim, run.plan.grid)
            for flag, label in (("0", "cuda default"), ("1", "cuda prefetch")):
                if run.over():
                    run.skip("tune", f"attention {acase.label} {label}", "over the section's time budget")
                    continue
                with common.environment(**{_PREFETCH_ENV: flag}):
                    for pass_ in ("fwd", "fwd+bwd"):
                        _time_tuned(run, "tune", acase, label, _attn_make(run, "cuda", acase), pass_)
    if "cuda" in common.kernel_backends(run.device):
        # The CUDA prompt_add forward with and without the weights staged in shared memory
        # (SA2VP_CUDA_PROMPT_ADD_STAGED, read at every launch).
        dtype = getattr(common.torch, run.plan.dtype_name)
        B, N, C, r = run.plan.prompt_add[0]
        pcase = common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=0.1, dtype=dtype)
        for flag, label in (("0", "cuda not staged"), ("1", "cuda staged (default)")):
            if run.over():
                run.skip("tune", f"prompt_add {pcase.label} {label}", "over the section's time budget")
                continue
            with common.environment(**{_STAGED_ENV: flag}):
                for pass_ in ("fwd", "fwd+bwd"):
                    _time_tuned(run, "tune", pcase, label,
                                lambda: common.prompt_add_workload("cuda", pcase, run.device, n_sets=2), pass_)
    from sa2vp_kernels._dispatch import triton_interpreted
    if "triton" not in common.kernel_backends(run.device) and not (run.args.tiny and triton_interpreted()):
        run.skip("tune", "triton", "the Triton kernels do not run on this device")
        return
    from sa2vp_kernels.triton import tuning

    with tuning.override():  # the sweeps vary the built-in defaults, whatever tuned file is in force
        _tune_triton(run)


def _tune_triton(run: Run) -> None:
    import dataclasses

    from sa2vp_kernels.triton import local_attn as tla
    from sa2vp_kernels.triton import prompt_add as tpa

    common = run.common
    dtype = getattr(common.torch, run.plan.dtype_name)
    B, N, C, r = run.plan.prompt_add[0]
    case = common.PromptAddCase(B, N, C, r, scale=0.1, dropout_p=0.1, dtype=dtype)
    default_rows = tpa._row_blocks
    chosen = default_rows(C, r, dtype)
    for block_m, warps, block_c in run.plan.tune_prompt_add or tpa.TUNE_CONFIGS:
        rows = tpa.tuned_row_blocks(block_m, warps, block_c)
        picked = rows(C, r, dtype)
        label = (f"triton m{picked[0]} w{picked[3]} c{picked[1]}" + (" chunked" if picked[4] else "")
                 + (" default" if picked == chosen else ""))
        if run.over():
            run.skip("tune", f"prompt_add {label}", "over the section's time budget")
            continue
        tpa._row_blocks = rows
        try:
            for pass_ in ("fwd", "fwd+bwd"):
                _time_tuned(run, "tune", case, label,
                            lambda: common.prompt_add_workload("triton", case, run.device, n_sets=2), pass_)
        finally:
            tpa._row_blocks = default_rows

    default_plan = tla._tile_plan
    for heads, dim in run.plan.layouts:
        acase = _attn_case(run, heads, dim, run.plan.grid)
        for warps, block_dc in run.plan.tune_attention:
            label = ("triton default" if (warps, block_dc) == (0, 0)
                     else f"triton w{warps or 'd'} dc{block_dc or 'd'}")
            if run.over():
                run.skip("tune", f"attention {acase.label} {label}", "over the section's time budget")
                continue

            def plan(*key, warps=warps, block_dc=block_dc):
                p = default_plan(*key)
                if p is None:
                    return None
                return dataclasses.replace(p, fwd_num_warps=warps or p.fwd_num_warps,
                                           block_dc=block_dc or p.block_dc)

            tla._tile_plan = plan
            try:
                _time_tuned(run, "tune", acase, label, _attn_make(run, "triton", acase))
            finally:
                tla._tile_plan = default_plan


# In order of need: the op benchmarks, then what the bandwidth targets and tuning need (kernel profiles,
# CUDA-graph timings without the host's launch overhead or the L2 flush's write-backs, the sweeps: none
# of which fitted the time of the first H100 run, where they came last), then the model steps (the
# ViT-B one was measured in that run) and the rest.
SECTIONS = ("bandwidth", "attention", "prompt_add", "prompt_map", "profile", "graphs", "tune", "end_to_end",
            "end_to_end_swin", "scaling", "windows", "end_to_end_large")


def run_sections(run: Run, names) -> None:
    table = {
        "bandwidth": section_bandwidth,
        "attention": section_attention,
        "prompt_add": section_prompt_add,
        "prompt_map": section_prompt_map,
        "end_to_end": lambda r: section_end_to_end(r, r.plan.e2e_first),
        "profile": section_profile,
        "scaling": section_scaling,
        "windows": section_windows,
        "end_to_end_large": lambda r: section_end_to_end(r, r.plan.e2e_last),
        "end_to_end_swin": lambda r: section_end_to_end(r, r.plan.e2e_swin, r.plan.swin_model),
        "graphs": section_graphs,
        "tune": section_tune,
    }
    for name in SECTIONS:
        if name not in names:
            continue
        if not run.begin(name):
            run.skip(name, name, "no time left" if run.alive else "the CUDA context is unusable")
            continue
        try:
            table[name](run)
        except Exception as exc:  # a broken section is recorded, the next one runs
            run.results["errors"][name] = traceback.format_exc(limit=8)
            run.log(f"   section {name} failed: {_short(exc)}")
            run.free()
            run.check_alive()
        run.flush()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cuda (default when a GPU is present) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few repetitions (a dry run)")
    parser.add_argument("--dry-run", action="store_true", help="same as --device cpu --tiny --no-copy")
    parser.add_argument("--out", default=None, help="folder for the results file (default bench/results)")
    parser.add_argument("--no-copy", action="store_true", help="do not also write the file into bench/results")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--providers", default="",
                        help="comma-separated providers of the op sections to run (default: all), e.g. "
                             "triton,cuda,reference,sdpa_masked,flex,natten,unfused,unfused_compiled")
    parser.add_argument("--no-graphs", action="store_true", help="eager timings only (no CUDA-graph replays)")
    args = parser.parse_args(argv)
    args.providers = set(filter(None, args.providers.split(",")))
    if args.dry_run:
        args.device, args.tiny, args.no_copy = "cpu", True, True
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu" or (args.device is None and not os.path.exists("/dev/nvidia0")):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device is available; use --device cpu --tiny (or --dry-run) on this machine", file=sys.stderr)
        return 2
    import common

    if args.out is None:
        args.out = str(common.RESULTS_DIR)
    plan = Plan.tiny() if args.tiny else Plan()
    if args.no_graphs:
        plan.graph_rep_ms = 0
    run = Run(args, plan)
    meta = run.results["meta"]
    run.log(f"sa2vp-kernels benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
            f"extension {'loaded' if meta['extension'] else 'MISSING'}), budget {args.budget:.0f} s")
    run_sections(run, set(args.sections.split(",")))
    run.flush()
    run.log(f"results: {', '.join(str(p) for p in run.paths)} ({time.monotonic() - run.t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
