"""Smoke tests of the GPU benchmark script and the report, on tiny CPU shapes.

They check that every code path of ``bench/run_gpu.py`` runs and that the providers with our exact
semantics (dense masked SDPA, FlexAttention's block mask, the kernels) agree with the reference; no
timing is checked.  ``pytest bench --benchmark-only`` (``make bench``) leaves them out.
"""
import json

import pytest
import torch

import common
import report
import run_gpu
import sa2vp_kernels


def test_neighbourhood_mask_by_hand():
    # grid 2 x 3 with one prefix token, window 3: the CLS row sees everything, grid (0, 0) sees its
    # 2 x 2 corner, grid (1, 1) the whole grid, and no grid row sees the prefix key.
    mask = common.neighbourhood_mask((2, 3), 3, 1, "cpu")
    assert mask.shape == (7, 7)
    assert mask[0].all()
    assert not mask[1:, 0].any()
    assert mask[1, 1:].tolist() == [True, True, False, True, True, False]
    assert mask[5, 1:].tolist() == [True, True, True, True, True, True]
    assert mask[3, 1:].tolist() == [False, True, True, False, True, True]


@pytest.mark.parametrize("provider", ["sdpa_masked", "flex"])
def test_peers_compute_local_cross_attention(provider):
    case = common.AttnCase(2, 3, 8, grid=(5, 4), window=3, num_prefix=1, dtype=torch.float32)
    work = common.attention_workload(provider, case, "cpu", compile_flex=False)
    errors = common.attention_errors(work, case)
    assert errors["rel_err_out"] < 1e-5


def test_ratios_and_targets():
    rec = {"section": "attention", "case": "c", "pass": "fwd+bwd"}
    records = [{**rec, "provider": "cpu", "ms": 2.0}, {**rec, "provider": "reference", "ms": 9.0},
               {**rec, "provider": "sdpa_masked", "ms": 1.0}, {**rec, "provider": "flex", "error": "boom"}]
    ratios = {(r["ours"], r["baseline"]): r for r in common.compute_ratios(records)}
    assert set(ratios) == {("cpu", "reference"), ("cpu", "sdpa_masked")}
    assert ratios[("cpu", "reference")]["speedup"] == pytest.approx(4.5)
    assert ratios[("cpu", "reference")]["target"] == 5.0 and not ratios[("cpu", "reference")]["met"]
    assert "target" not in ratios[("cpu", "sdpa_masked")]


def test_dry_run_and_report(tmp_path):
    rc = run_gpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "600",
                       "--sections", "bandwidth,attention,prompt_add,prompt_map,scaling",
                       "--providers", "cpu,reference,sdpa_masked,flex,unfused"])
    assert rc == 0
    (path,) = tmp_path.glob("cpu-tiny-*.json")
    results = json.loads(path.read_text())
    records = results["records"]
    assert not [r for r in records if r.get("error")], records
    assert {r["section"] for r in records} == {"attention", "prompt_add", "prompt_map", "scaling"}
    assert results["bandwidth"]["gbps"] > 0
    checked = [r for r in records if r.get("rel_err_out") is not None]
    assert {r["provider"] for r in checked} >= {"cpu", "sdpa_masked", "flex"}
    assert all(r["rel_err_out"] < 1e-5 for r in checked)
    assert all(r["ms"] > 0 and r["bytes"] > 0 for r in records)
    written = report.report(path)
    text = written[0].read_text()
    assert "### Local cross attention" in text and "| case | pass |" in text
    assert [w.suffix for w in written] == [".md", ".png"]


def test_graph_timings_are_added_last(tmp_path, monkeypatch):
    # The bookkeeping of the "graphs" section (which eager records get a graph time, and that "bwd" never
    # does) runs on the CPU with the CUDA-graph timer replaced by a stand-in that still calls the runner.
    args = run_gpu.parse_args(["--dry-run", "--out", str(tmp_path), "--providers", "cpu,reference"])
    run = run_gpu.Run(args, run_gpu.Plan.tiny())
    run.cuda = True
    run.plan.graph_below_ms = float("inf")
    calls = []

    def graph_timer(fn, device, rep_ms):
        fn()
        calls.append(device)
        return {"ms_graph": 0.25, "ms_graph_min": 0.2, "graph_calls": 1}

    monkeypatch.setattr(common, "time_cuda_graph", graph_timer)
    run.begin("attention")
    run_gpu.section_attention(run)
    run.begin("graphs")
    run_gpu.section_graphs(run)
    records = run.results["records"]
    assert records and not [r for r in records if r.get("error")]
    for r in records:
        assert ("ms_graph" in r) == (r["pass"] != "bwd"), r
    assert len(calls) == sum(r["pass"] != "bwd" for r in records)


def test_tune_section_restores_the_defaults(tmp_path):
    # The sweep swaps the launch-configuration helpers of the Triton ops for each configuration; under the
    # interpreter (tiny shapes) every configuration must run, be labelled, and leave the defaults in place.
    from sa2vp_kernels.triton import local_attn as tla
    from sa2vp_kernels.triton import prompt_add as tpa

    defaults = (tpa._row_blocks, tla._tile_plan)
    args = run_gpu.parse_args(["--dry-run", "--out", str(tmp_path), "--no-copy"])
    plan = run_gpu.Plan.tiny()
    plan.layouts = plan.layouts[:1]
    plan.tune_prompt_add = ((16, 4, 0), (32, 8, 0), (16, 4, 16))  # the first: the default at the tiny shape
    plan.tune_attention = ((0, 0), (8, 16), (2, 0))
    run = run_gpu.Run(args, plan)
    run.begin("tune")
    run_gpu.section_tune(run)
    assert (tpa._row_blocks, tla._tile_plan) == defaults
    records = run.results["records"]
    assert not [r for r in records if r.get("error")], records
    labels = [r["provider"] for r in records]
    assert len(labels) == 2 * len(plan.tune_prompt_add) + len(plan.tune_attention)  # prompt_add: fwd, fwd+bwd
    assert sum(label.endswith("default") for label in labels) == 3
    assert "triton w8 dc16" in labels and all(r["ms"] > 0 for r in records)
    # the tiny shape's rows are 32 channels wide: 16-channel chunks run the chunked kernels
    assert {"triton m16 w4 c16 chunked", "triton m32 w8 c32"} <= set(labels)


def test_gpu_rerun_script_runs_a_list_of_tests(tmp_path):
    """bench/gpu_rerun.sh splits the ids (Triton ones first), runs them and writes its logs; here the
    GPU tests skip, and a deliberately failing id shows that failures are collected as they happen."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    failing = tmp_path / "test_fails.py"
    (tmp_path / "conftest.py").write_text((root / "tests" / "conftest.py").read_text())  # the failure log
    failing.write_text("def test_fails_on_purpose():\n    assert 1 == 2, 'planted failure'\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("tests/test_prompt_map.py::test_gpu_backward_is_deterministic[triton]\n"
                   f"{failing}::test_fails_on_purpose\n\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SA2VP_SKIP_BUILD="1", SA2VP_TEST_WORKERS="2")
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_rerun.sh"), str(ids)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "pytest-triton.log").exists() and (out / "pytest-other.log").exists()
    log = (out / "failures.log").read_text()
    assert "planted failure" in log
    assert log.count("test_fails_on_purpose (call)") == 1, log  # the xdist controller writes, no worker
    assert "other tests (rc 1): 0 passed, 1 failed" in proc.stdout, proc.stdout


def test_profile_section(tmp_path):
    """The profile section lists, per fused op and provider, the time of one fwd+bwd call and its kernels
    (on a CPU: the package's operators), and the report shows them."""
    rc = run_gpu.main(["--dry-run", "--out", str(tmp_path), "--budget", "600", "--sections", "profile",
                       "--providers", "cpu,unfused"])
    assert rc == 0
    (path,) = tmp_path.glob("cpu-tiny-*.json")
    profiles = json.loads(path.read_text())["profile"]
    assert {(p["section"], p["provider"]) for p in profiles} == {
        ("prompt_add", "cpu"), ("prompt_add", "unfused"), ("attention", "cpu")}
    assert not [p for p in profiles if p.get("error")], profiles
    assert all(p["wall_ms"] > 0 for p in profiles)
    ours = [p for p in profiles if p["provider"] == "cpu"]
    assert all(p["kernels"] and p["kernel_ms"] > 0 for p in ours), ours
    names = {k[0] for p in ours for k in p["kernels"]}
    assert {"sa2vp_kernels::prompt_add_fwd", "sa2vp_kernels::prompt_add_bwd"} <= names, names
    text = report.report(path, make_plot=False)[0].read_text()
    assert "### Kernel profile" in text and "sa2vp_kernels::prompt_add_bwd" in text
    assert "Kernel profile" in report.summary(json.loads(path.read_text()))


def test_triton_host_script(tmp_path):
    """bench/triton_host.py times the three paths of every case (in its own process: it stubs the launches)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "triton_host.py"
    proc = subprocess.run([sys.executable, str(script), "--rounds", "3", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("cpu-triton-host-*.json")
    rows = json.loads(path.read_text())["host"]
    assert {(r["op"], r["call"]) for r in rows} == {
        (op, call) for op in ("local_cross_attention", "prompt_add")
        for call in ("fwd (no grad)", "fwd (grad)", "fwd+bwd")}
    assert all(r["eager_us"] > 0 and r["eager_hop_us"] > 0 and r["registered_us"] > 0 for r in rows)


def test_e2e_cpu_script_both_precisions(tmp_path):
    """bench/e2e_cpu.py times the fused and reference models in fp32 and under CPU bf16 autocast."""
    import e2e_cpu

    assert e2e_cpu.main(["--models", "vit_tiny_patch16_224", "--batch", "1", "--steps", "1", "--amp", "fp32,bf16",
                         "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("cpu-e2e-*.json")
    rows = json.loads(path.read_text())["results"]
    assert [r["amp"] for r in rows] == ["fp32", "bf16"]
    assert all(r["cpu_s"] > 0 and r["reference_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert rows[1]["speedup_vs_fp32"] == pytest.approx(rows[0]["cpu_s"] / rows[1]["cpu_s"])
    with pytest.raises(SystemExit):
        e2e_cpu.main(["--amp", "fp16", "--out", str(tmp_path)])


@pytest.mark.skipif(not sa2vp_kernels.extension_available(), reason="needs the compiled CPU kernels")
def test_cpu_targets_two_threads(tmp_path):
    """bench/cpu_targets.py with two threads: every ratio row, the kernels on one thread in the same
    rounds, a file of its own beside the one-thread results, and torch's thread count left as asked."""
    import cpu_targets

    old = torch.get_num_threads()
    try:
        assert cpu_targets.main(["--rounds", "2", "--threads", "2", "--out", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    (path,) = tmp_path.glob("cpu-targets-*.json")
    assert path.name.endswith("-2-threads.json")
    data = json.loads(path.read_text())
    assert data["meta"]["cpu_threads"] == 2
    rows = data["ratios"]
    assert {(r["section"], r["baseline"]) for r in rows} == {
        ("attention", "reference"), ("attention", "sdpa_masked"), ("attention", "cpu_1_thread"),
        ("prompt_add", "unfused"), ("prompt_add", "gemms"), ("prompt_add", "cpu_1_thread")}
    assert len(rows) == 12 and all(r["speedup"] > 0 for r in rows)
    assert sum("target" in r for r in rows) == 4


def test_gpu_variants_patches_resolve_and_are_undone(tmp_path):
    """Every variant of bench/gpu_variants.py names module attributes that exist and launch settings a
    tuned file accepts, which apply at the benchmark shape, and leaves the defaults in place
    afterwards; a dry run with one provider writes its rows."""
    import importlib

    import gpu_variants

    from sa2vp_kernels.triton import local_attn as tla
    from sa2vp_kernels.triton import prompt_add as tpa
    from sa2vp_kernels.triton import tuning

    defaults = (tla._tile_plan, tla._PREFIX_STAGES, tla.FWD_FUSED_PREFIX, tla.BWD_FUSED_PREFIX, tla.FWD_EARLY_V,
                tla.FWD_STREAM, tla._STREAM_MIN_PROGRAMS, tla.BWD_STREAM, tla._BWD_STREAM_NUM_WARPS,
                tla._BWD_STREAM_SEGMENTS, tpa._row_blocks,
                tpa.FWD_ONE_PASS, tpa.BWD_FROM_Z, tpa.BWD_FINALIZE_KERNEL)
    attention, prompt_add = gpu_variants._attention_variants(), gpu_variants._prompt_add_variants()
    for section in (attention, prompt_add):
        assert len({v[0] for v in section}) == len(section)  # labels are unique
    variants = attention + prompt_add
    cpu = torch.device("cpu")
    for variant in variants:
        label, provider, env, patches, settings = variant
        assert (settings is not None) == (provider == "triton"), label
        op = "local_attention" if variant in attention else "prompt_add"
        with gpu_variants._patched(patches), tuning.override(**{op: settings or {}}):
            for module_name, attr, _ in patches:
                assert hasattr(importlib.import_module(module_name), attr), label
        if settings and op == "local_attention":
            # (the benchmark shape: every tile plan named fits, so the variant runs as labelled)
            for D in (64, 768):
                fused = int(settings.get("fwd_fused_prefix", False))
                plan = tla._fwd_tile_plan(settings, 14, 14, 1, 1, fused, D, torch.bfloat16, fused)
                assert plan is not None and plan.rows == (settings.get("rows") or plan.rows), label
            # (the streaming forward's rows run it at B=64, 12 x 64)
            assert tla.stream_applies(settings, 64 * 12, 14, 14, 3, 1, 64) == bool(settings.get("fwd_stream")), label
            if settings.get("bwd_stream"):
                with gpu_variants._patched(patches):
                    assert tla._bwd_stream_fits(64 * 12, 14, 14, 3, 1, 64), label
        elif settings and {"block_m", "num_warps", "block_c"} & set(settings):
            blocks = tpa._fwd_row_blocks(settings, 768, 16, torch.bfloat16, cpu)
            assert blocks != tpa._row_blocks(768, 16, torch.bfloat16), label  # (they apply at 768 channels)
        assert (tla._tile_plan, tla._PREFIX_STAGES, tla.FWD_FUSED_PREFIX, tla.BWD_FUSED_PREFIX, tla.FWD_EARLY_V,
                tla.FWD_STREAM, tla._STREAM_MIN_PROGRAMS, tla.BWD_STREAM, tla._BWD_STREAM_NUM_WARPS,
                tla._BWD_STREAM_SEGMENTS, tpa._row_blocks,
                tpa.FWD_ONE_PASS, tpa.BWD_FROM_Z, tpa.BWD_FINALIZE_KERNEL) == defaults
    assert gpu_variants.main(["--tiny", "--providers", "unfused", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-variants.json")
    records = json.loads(path.read_text())["records"]
    assert {(r["variant"], r["pass"]) for r in records} == {("unfused", "fwd"), ("unfused", "fwd+bwd")}
    assert len(records) == 4 and all(r["ms"] > 0 for r in records)  # p = 0.1 and the p = 0 diagnostic
    with pytest.raises(SystemExit):
        gpu_variants.main(["--tiny", "--providers", "cuda,nope"])


def test_variants_summary_ranks_and_checks_targets():
    """bench/variants_summary.py: fastest first, ratios against each provider's default, the 60 % and
    2.5x targets of the forwards."""
    import variants_summary

    case = "B64 N197 C768 r16 p0.1 bfloat16"
    rec = [{"section": "prompt_add", "case": case, "pass": "fwd", "variant": v, "provider": p, "ms": ms,
            "bw_frac": f} for v, p, ms, f in (("triton", "triton", 0.04, 0.35), ("triton m32", "triton", 0.02, 0.7),
                                                ("unfused", "unfused", 0.09, 0.15))]
    rec[1]["kernels"] = [["_fwd_wide_kernel", 1, 0.018], ["_combine_parts_kernel", 2, 0.001]]
    lines = variants_summary.summarize(rec)
    assert lines.pop(2) == "      kernels (eager, ms per call): fwd_wide 0.0180, combine_parts 0.0010 x2"
    assert lines[0] == f"prompt_add {case} fwd"
    assert [ln.split()[0:2] for ln in lines[1:]] == [["triton", "m32"], ["triton", "0.0400"], ["unfused", "0.0900"]]
    assert "2.00x default" in lines[1] and "MEETS 60 %" in lines[1] and "4.50x unfused (MEETS 2.5x)" in lines[1]
    assert "below 60 %" in lines[2] and "2.25x unfused (below 2.5x)" in lines[2]


def _variant_records():
    """Synthetic bench/gpu_variants.py records of one GPU: two attention head dims with a prefix token,
    a diagnostic without one, prompt_add with and without dropout."""
    def attn(D, variant, settings, pass_, ms, T=1, **extra):
        return {"section": "attention", "case": f"B64 N{196 + T} {768 // D}x{D}", "variant": variant,
                "provider": "triton", "pass": pass_, "settings": settings, "head_dim": D, "num_prefix": T,
                "ms": ms, "rel_err_out": 4e-3, "rel_err_grad": 5e-3, **extra}

    def pa(p, variant, settings, pass_, ms):
        return {"section": "prompt_add", "case": f"B64 N197 C768 r16 p{p:g} bfloat16", "variant": variant,
                "provider": "triton", "pass": pass_, "settings": settings, "width": 768, "rank": 16,
                "dropout_p": p, "ms": ms}

    fused, rows4 = {"fwd_fused_prefix": True}, {"fwd_fused_prefix": True, "rows": 4, "fwd_num_warps": 4}
    return [
        attn(768, "triton", {}, "fwd", 0.045), attn(768, "triton fused", fused, "fwd", 0.040),
        attn(768, "triton fused rows4 w4", rows4, "fwd", 0.030),
        attn(768, "inexact", {"rows": 1}, "fwd", 0.020, rel_err_out=0.5),  # too large an error
        {**attn(768, "broken", {"stages": 3}, "fwd", 0.010), "error": "RuntimeError: boom"},
        attn(768, "triton prefix st3", None, "fwd", 0.015),  # not expressible in a file
        attn(768, "triton fused fwd+dq", {**fused, "bwd_fused_prefix": True}, "fwd", 0.029),  # (a backward row)
        attn(768, "triton fused", fused, "fwd+bwd", 0.200),
        attn(768, "triton fused fwd+dq", {**fused, "bwd_fused_prefix": True}, "fwd+bwd", 0.180),
        attn(768, "triton", {}, "fwd+bwd", 0.210), attn(768, "triton dq fused", {"bwd_fused_prefix": True}, "fwd+bwd", 0.190),
        attn(768, "triton w4", {"fwd_num_warps": 4}, "fwd", 0.001, T=0),  # the diagnostic without a prefix
        attn(64, "triton", {}, "fwd", 0.065), attn(64, "triton fused", fused, "fwd", 0.0645),  # within 2 %
        attn(64, "triton fused", fused, "fwd+bwd", 0.300),
        attn(64, "triton fused fwd+dq", {**fused, "bwd_fused_prefix": True}, "fwd+bwd", 0.250),
        attn(64, "triton", {}, "fwd+bwd", 0.300), attn(64, "triton dq fused", {"bwd_fused_prefix": True}, "fwd+bwd", 0.310),
        pa(0.1, "triton", {}, "fwd", 0.037), pa(0.1, "triton", {}, "fwd+bwd", 0.178),
        pa(0.1, "triton m32 w8 c128", {"block_m": 32, "num_warps": 8, "block_c": 128}, "fwd", 0.025),
        pa(0.1, "triton m32 w8 c128", {"block_m": 32, "num_warps": 8, "block_c": 128}, "fwd+bwd", 0.170),
        pa(0.1, "triton 3-pass", {"fwd_one_pass": False}, "fwd", 0.040),
        pa(0.1, "triton bwd-msg", {"bwd_from_z": False}, "fwd+bwd", 0.190),
        pa(0.1, "triton torch-sums", {"bwd_finalize_kernel": False}, "fwd+bwd", 0.150),
        pa(0.0, "triton 3-pass", {"fwd_one_pass": False}, "fwd", 0.001),  # the diagnostic without dropout
        {**pa(0.1, "unfused", None, "fwd", 0.09), "provider": "unfused"},
    ]


def _variants_file(tmp_path, records, device="NVIDIA Test GPU"):
    meta = {"device": device, "device_tag": "nvidia-test-gpu", "date": "2026-11-27", "source": "bench/gpu_variants.py",
            "torch": "2.11.0", "triton": "3.6.0"}
    path = tmp_path / f"variants-{len(records)}.json"
    path.write_text(json.dumps({"meta": meta, "records": records}))
    return path


def test_apply_tuning_keeps_what_beat_the_defaults(tmp_path, monkeypatch):
    """bench/apply_tuning.py: the fastest exact forward per head dim and for prompt_add, a backward
    switch only where it won every comparison, nothing within the margin; the file it writes is one
    the package loads and applies by head dim, rank and dtype."""
    import apply_tuning

    from sa2vp_kernels.triton import tuning

    doc = apply_tuning.choose([json.loads(_variants_file(tmp_path, _variant_records()).read_text())])
    (entry,) = doc["local_attention"]  # 12 x 64: the fused forward is within 2 % and dq fused lost once
    assert entry["min_head_dim"] == 65 and "max_head_dim" not in entry
    assert entry["settings"] == {"fwd_fused_prefix": True, "rows": 4, "fwd_num_warps": 4, "bwd_fused_prefix": True}
    assert entry["measured"]["fwd"] == {"case": "B64 N197 1x768", "default_ms": 0.045, "tuned_ms": 0.03,
                                        "variant": "triton fused rows4 w4"}
    (entry,) = doc["prompt_add"]
    assert entry["max_rank"] == 16
    assert entry["settings"] == {"block_m": 32, "num_warps": 8, "block_c": 128, "bwd_finalize_kernel": False}

    out = tmp_path / "tuned" / "nvidia-test-gpu.json"
    copy = tmp_path / "logs"
    src = _variants_file(tmp_path, _variant_records())
    assert apply_tuning.main([str(src), "--out", str(out), "--copy", str(copy)]) == 0
    assert json.loads(out.read_text()) == json.loads((copy / out.name).read_text())
    monkeypatch.setenv(tuning.ENV, str(out))
    cuda0 = torch.device("cuda", 0)
    assert tuning.attention_settings(cuda0, torch.bfloat16, 768)["rows"] == 4
    assert tuning.attention_settings(cuda0, torch.bfloat16, 64) == {}
    assert tuning.prompt_add_settings(cuda0, torch.float16, 768, 16)["block_m"] == 32
    assert tuning.prompt_add_settings(cuda0, torch.float16, 768, 32) == {}

    # A rerun where nothing beats the defaults removes the file (the built-in defaults apply again).
    plain = [r for r in _variant_records() if r["settings"] in ({}, None)]
    assert apply_tuning.main([str(_variants_file(tmp_path, plain)), "--out", str(out)]) == 0
    assert not out.exists()
    # Results of a dry run on the CPU, or of two devices, are refused.
    cpu = _variants_file(tmp_path, plain[:1])
    data = json.loads(cpu.read_text())
    data["meta"]["device_tag"] = "cpu"
    cpu.write_text(json.dumps(data))
    with pytest.raises(SystemExit):
        apply_tuning.main([str(cpu)])
    with pytest.raises(SystemExit):
        apply_tuning.main([str(src), str(_variants_file(tmp_path, plain[:2], device="Other GPU"))])


def _packed_logs(out) -> set:
    """The logs in a GPU run's logs.tar.gz; the run's folder holds at most 8 files and no loose logs
    (what the device tool brings back)."""
    import tarfile

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert not [p for p in files if p.suffix in (".log", ".txt")], files
    with tarfile.open(out / "logs.tar.gz") as tar:
        return set(tar.getnames())


def test_gpu_tune_script_dry_run(tmp_path):
    """bench/gpu_tune.sh end to end on the CPU (tiny shapes, few variants, the CUDA steps left out by
    their time threshold): the variants' results, the tuned file written from them (a copy in the run's
    folder), the Triton test step, the benchmarks' results file and the summary; the logs packed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sa2vp_kernels.triton import tuning

    root = Path(__file__).resolve().parents[1]
    out, tuned = tmp_path / "out", tmp_path / "tuned" / "cpu.json"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SA2VP_SKIP_BUILD="1", SA2VP_TEST_WORKERS="0",
               SA2VP_VARIANTS_ARGS="--tiny --quick", SA2VP_BENCH_ARGS="--tiny", SA2VP_TUNE_CUDA_MIN="100000",
               SA2VP_APPLY_ARGS=f"--out {tuned} --margin 0")
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_tune.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    (variants,) = out.glob("*-variants-triton.json")
    records = json.loads(variants.read_text())["records"]
    assert {r["variant"] for r in records} >= {"triton", "triton fused", "triton m32 w8 c128", "unfused"}
    assert all(r["settings"] is not None for r in records if r["provider"] == "triton")
    # the main forward variants' kernels (profiled; on the CPU there are none, the record is still written)
    profiled = [r for r in records if r["section"] == "attention" and r["variant"] == "triton fused"
                and r["pass"] == "fwd"]
    assert profiled and all(isinstance(r["kernels"], list) and all(ms >= 0 for _, _, ms in r["kernels"])
                            for r in profiled)
    # --margin 0: whatever was fastest is written (timings under the interpreter mean nothing).
    assert f"tuned settings: wrote {tuned}" in log, log
    assert json.loads((out / tuned.name).read_text()) == json.loads(tuned.read_text())
    tuning.parse(json.loads(tuned.read_text()))
    assert "tests triton (rc 0)" in log and "benchmarks: rc 0" in log, log
    (bench,) = out.glob("cpu-tiny-*.json")
    assert {r["section"] for r in json.loads(bench.read_text())["records"]} >= {"attention", "prompt_add"}
    assert "build, extension tests, CUDA variants: not run" in log
    assert "prompt_add B2 N21 C32 r4 p0.1 float32 fwd" in log  # bench/variants_summary.py's table
    assert _packed_logs(out) >= {"variants-triton.log", "apply-tuning.log", "pytest-triton.log", "bench.log",
                                 "variants-summary.txt"}


def test_gpu_check_script_dry_run(tmp_path):
    """bench/gpu_check.sh end to end on the CPU (no build, one test file, tiny benchmark sections): the
    import check, the test step, the results file with its tables, the summary; nothing is copied into
    bench/results with SA2VP_NO_COPY=1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    before = set((root / "bench" / "results").iterdir())
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SA2VP_SKIP_BUILD="1", SA2VP_TEST_WORKERS="0", SA2VP_NO_COPY="1",
               SA2VP_GPU_BUDGET="300", SA2VP_GPU_TESTS="tests/test_triton_tuning.py",
               SA2VP_BENCH_ARGS="--tiny --sections bandwidth,attention,prompt_add --providers triton,reference,unfused")
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "import sa2vp_kernels: ok" in log and "build: skipped" in log, log
    assert "GPU tests:" in log and "skipped" in log.split("GPU tests:")[-1], log
    (results,) = out.glob("cpu-tiny-*.json")
    records = json.loads(results.read_text())["records"]
    assert {r["section"] for r in records} == {"attention", "prompt_add"} and not [r for r in records if r.get("error")]
    assert (out / results.name.replace(".json", ".md")).exists()
    assert set((root / "bench" / "results").iterdir()) == before
    assert _packed_logs(out) >= {"build.log", "pytest-gpu.log", "bench.log"}


def test_collect_tune_copies_a_run_into_place(tmp_path, monkeypatch, capsys):
    """bench/collect_tune.py: the tuned file into the package's tuned/ folder (checked first), the results
    and logs (loose or in the run's logs.tar.gz) into bench/results with the device, date and "tune" in
    their names; another run of the same card and day gets "-tune2" names instead of replacing the first;
    a CPU dry run and a malformed tuned file are refused."""
    import tarfile

    import collect_tune

    from sa2vp_kernels.triton import tuning

    root = tmp_path / "repo"
    monkeypatch.setattr(collect_tune, "ROOT", root)
    monkeypatch.setattr(tuning, "TUNED_DIR", root / "tuned")
    out = tmp_path / "out"
    out.mkdir()
    tag = "nvidia-h100-80gb-hbm3-2026-11-28"
    for name in (f"{tag}-variants-triton.json", f"{tag}.json", f"{tag}.md", "bench.log", "pytest-triton.log"):
        (out / name).write_text(name)
    packed = tmp_path / "apply-tuning.log"
    packed.write_text("packed apply-tuning.log")
    stray = tmp_path / "notes.sh"
    stray.write_text("not a log")
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        tar.add(packed, arcname="apply-tuning.log")
        tar.add(stray, arcname="notes.sh")
    tuned = {"format": 1, "device": "NVIDIA H100 80GB HBM3", "prompt_add": [{"settings": {"block_m": 32}}]}
    (out / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(tuned))
    assert collect_tune.main([str(out)]) == 0
    results = root / "bench" / "results"
    first = [f"{tag}-tune-apply-tuning.log", f"{tag}-tune-bench.log", f"{tag}-tune-pytest-triton.log",
             f"{tag}-tune-variants-triton.json", f"{tag}-tune.json", f"{tag}-tune.md"]
    assert sorted(p.name for p in results.iterdir()) == first
    assert (results / f"{tag}-tune-bench.log").read_text() == "bench.log"
    assert (results / f"{tag}-tune-apply-tuning.log").read_text() == "packed apply-tuning.log"
    assert json.loads((root / "tuned" / "nvidia-h100-80gb-hbm3.json").read_text()) == tuned
    assert "git add " in capsys.readouterr().out

    assert collect_tune.main([str(out)]) == 0  # the same run again: the same names
    assert sorted(p.name for p in results.iterdir()) == first
    (out / f"{tag}.json").write_text("a second run")
    assert collect_tune.main([str(out)]) == 0
    second = sorted(p.name for p in results.iterdir() if p.name not in first)
    assert second == [name.replace("-tune", "-tune2") for name in first]
    assert (results / f"{tag}-tune.json").read_text() == f"{tag}.json"  # the first run's results kept
    assert (results / f"{tag}-tune2.json").read_text() == "a second run"

    tuned["prompt_add"][0]["settings"]["block_m"] = 3
    (out / "nvidia-h100-80gb-hbm3.json").write_text(json.dumps(tuned))
    assert collect_tune.main([str(out), "--dry-run"]) == 1
    assert "'block_m' must be a power of two" in capsys.readouterr().err
    dry = tmp_path / "dry"
    dry.mkdir()
    (dry / "cpu-2026-11-28-variants-triton.json").write_text("{}")
    assert collect_tune.main([str(dry)]) == 1
    assert "dry run on the CPU" in capsys.readouterr().err


def test_gpu_tune_script_cuda_steps_alone(tmp_path):
    """SA2VP_TUNE_STEPS=cuda: only the CUDA steps (here without a build; the CUDA rows record that the
    tensors are on the CPU), for a second, shorter call on a lent GPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, SA2VP_SKIP_BUILD="1", SA2VP_TEST_WORKERS="0", SA2VP_TUNE_STEPS="cuda",
               SA2VP_VARIANTS_ARGS="--tiny --quick", SA2VP_TUNE_TESTS_EXT="tests/test_cuda_variants_gpu.py")
    proc = subprocess.run(["bash", str(root / "bench" / "gpu_tune.sh")], cwd=root, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert not list(out.glob("*-variants-triton.json"))
    assert "bench.log" not in _packed_logs(out) and "variants-cuda.log" in _packed_logs(out)
    assert "tuned settings: not applied" in log
    assert "build: skipped" in log and "diag_bad_args: rc 0" in log and "cuda variants: rc 0" in log, log
    (variants,) = out.glob("*-variants-cuda.json")
    assert {r["provider"] for r in json.loads(variants.read_text())["records"]} == {"cuda"}
