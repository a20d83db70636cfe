"""Per-GPU tuned launch settings of the Triton kernels (sa2vp_kernels/triton/tuning.py): the file format
and its errors, which file and which entry apply to a call, that the launchers follow the settings
(the kernels and launch parameters they pick) with results that still match the references, and on a
GPU with a tuned file of its own, the benchmark shapes against float32 references with and without it.
"""
import json

import pytest
import torch

from sa2vp_kernels.triton import local_attn as tla
from sa2vp_kernels.triton import prompt_add as tpa
from sa2vp_kernels.triton import tuning

CUDA0 = torch.device("cuda", 0)


def _doc(**ops):
    return {"format": 1, "device": "Test GPU", **ops}


def _write(tmp_path, doc, name="tuned.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_device_tag():
    assert tuning.device_tag("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.device_tag("NVIDIA H200") == "nvidia-h200"
    assert tuning.device_tag(" NVIDIA A100-SXM4-40GB ") == "nvidia-a100-sxm4-40gb"


@pytest.mark.parametrize("doc,match", [
    ([], r"expected a JSON object"),
    ({"format": 2}, r"'format' must be 1, got 2"),
    (_doc(extra=1), r"unknown keys \['extra'\]"),
    (_doc(local_attention={}), r"'local_attention' must be a list"),
    (_doc(local_attention=[{"rows": 4}]), r"local_attention\[0\]: expected an object with 'settings'"),
    (_doc(local_attention=[{"settings": {"row": 4}}]), r"local_attention\[0\]: unknown setting 'row'"),
    (_doc(local_attention=[{"settings": {}}, {"settings": {"fwd_fused_prefix": 1}}]),
     r"local_attention\[1\]: 'fwd_fused_prefix' must be true or false, got 1"),
    (_doc(local_attention=[{"settings": {"rows": -1}}]), r"'rows' must be >= 0"),
    (_doc(local_attention=[{"settings": {"fwd_num_warps": 3}}]), r"'fwd_num_warps' must be a power of two, got 3"),
    (_doc(local_attention=[{"settings": {"stages": 1.5}}]), r"'stages' must be an integer"),
    (_doc(local_attention=[{"max_rank": 4, "settings": {}}]), r"unknown keys \['max_rank'\]; bounds are"),
    (_doc(local_attention=[{"max_head_dim": -2, "settings": {}}]), r"'max_head_dim' must be a non-negative"),
    (_doc(prompt_add=[{"settings": {"block_c": 100}}]), r"'block_c' must be a power of two >= 16"),
    (_doc(prompt_add=[{"settings": {"fwd_fused_prefix": True}}]), r"prompt_add\[0\]: unknown setting"),
])
def test_bad_documents_name_the_problem(doc, match):
    with pytest.raises(ValueError, match=match):
        tuning.parse(doc, "my.json")


def test_bad_files_name_the_file(tmp_path, monkeypatch):
    missing = str(tmp_path / "missing.json")
    monkeypatch.setenv(tuning.ENV, missing)
    with pytest.raises(ValueError, match=r"SA2VP_TRITON_TUNED: cannot read the tuned settings .*missing\.json"):
        tuning.attention_settings(CUDA0, torch.bfloat16, 64)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv(tuning.ENV, str(bad))
    with pytest.raises(ValueError, match=r"tuned settings .*bad\.json: not valid JSON"):
        tuning.prompt_add_settings(CUDA0, torch.float16, 768, 16)
    with pytest.raises(ValueError, match=r"override\(local_attention\): unknown setting 'fused'"):
        with tuning.override(local_attention={"fused": True}):
            pass


def test_which_file_applies(tmp_path, monkeypatch):
    path = _write(tmp_path, _doc())
    monkeypatch.setenv(tuning.ENV, path)
    assert tuning.active_file(CUDA0) == path
    assert tuning.active_file(torch.device("cpu")) == path  # an explicit file applies on every device
    for off in ("0", "off", "None"):
        monkeypatch.setenv(tuning.ENV, off)
        assert tuning.active_file(CUDA0) is None
    monkeypatch.delenv(tuning.ENV)
    assert tuning.active_file(torch.device("cpu")) is None
    # Unset: the package's file named after the GPU model, where there is one.
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU 80GB")
    tuning._device_file.cache_clear()
    try:
        assert tuning.active_file(CUDA0) is None
        _write(tmp_path, _doc(), "test-gpu-80gb.json")
        tuning._device_file.cache_clear()
        assert tuning.active_file(CUDA0) == str(tmp_path / "test-gpu-80gb.json")
    finally:
        tuning._device_file.cache_clear()


def test_which_entry_applies(tmp_path, monkeypatch):
    doc = _doc(local_attention=[{"max_head_dim": 64, "settings": {"fwd_early_v": True}},
                                {"min_head_dim": 65, "max_head_dim": 1024, "settings": {"rows": 4}}],
               prompt_add=[{"max_rank": 16, "min_channels": 257, "settings": {"block_m": 32}, "measured": {}}])
    monkeypatch.setenv(tuning.ENV, _write(tmp_path, doc))
    assert tuning.attention_settings(CUDA0, torch.bfloat16, 64) == {"fwd_early_v": True}
    assert tuning.attention_settings(CUDA0, torch.float16, 8) == {"fwd_early_v": True}
    assert tuning.attention_settings(CUDA0, torch.bfloat16, 768) == {"rows": 4}
    assert tuning.attention_settings(CUDA0, torch.bfloat16, 2048) == {}
    assert tuning.prompt_add_settings(CUDA0, torch.bfloat16, 768, 16) == {"block_m": 32}
    assert tuning.prompt_add_settings(CUDA0, torch.bfloat16, 768, 17) == {}
    assert tuning.prompt_add_settings(CUDA0, torch.bfloat16, 256, 16) == {}
    # Only 16-bit inputs on a GPU (the settings were measured there).
    assert tuning.attention_settings(CUDA0, torch.float32, 64) == {}
    assert tuning.attention_settings(torch.device("cpu"), torch.bfloat16, 64) == {}
    # override() wins over the file, on every device and dtype, and ends with its block.
    with tuning.override(local_attention={"stages": 3}):
        assert tuning.attention_settings(torch.device("cpu"), torch.float64, 64) == {"stages": 3}
        assert tuning.prompt_add_settings(CUDA0, torch.bfloat16, 768, 16) == {}
    assert tuning.attention_settings(CUDA0, torch.bfloat16, 64) == {"fwd_early_v": True}


def _qkv(B, H, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _attention_reference(q, k, v, grid, window, T, grad):
    from sa2vp_kernels.reference import local_cross_attention_vectorized

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = local_cross_attention_vectorized(q, k, v, grid, window, T, "clip", q.shape[-1] ** -0.5)
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad)


def _recording(monkeypatch, module):
    """Record (kernel, launch meta) of every kernel the module launches."""
    launched = []
    real = module.wrap_triton

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **meta):
                launched.append((self.kernel, meta))
                return real(self.kernel)[grid](*args, **meta)
            return run

    monkeypatch.setattr(module, "wrap_triton", Recorder)
    return launched


@pytest.mark.parametrize("settings", [
    {},
    {"fwd_fused_prefix": True, "bwd_fused_prefix": True, "rows": 2, "fwd_num_warps": 2, "stages": 3},
    {"fwd_early_v": True, "rows": 1},
    {"fwd_fused_prefix": True, "rows": 5},  # 5 rows of 9 columns with halos do not fit: the default plan
], ids=["none", "fused-rows2", "early-v-rows1", "rows-too-tall"])
def test_attention_launchers_follow_the_settings(settings, monkeypatch):
    B, H, grid, window, T, D = 2, 2, (5, 9), 3, 1, 24
    q, k, v = _qkv(B, H, T + grid[0] * grid[1], D, seed=4)
    grad = _qkv(B, H, T + grid[0] * grid[1], D, seed=9)[0]
    launched = _recording(monkeypatch, tla)
    args = (grid[0], grid[1], window, T, False, D ** -0.5)
    with tuning.override(local_attention=settings):
        out, lse = tla.local_attn_fwd(q, k, v, *args)
        grads = tla.local_attn_bwd(grad, q, k, v, out, lse, *args)
    ref_out, ref_grads = _attention_reference(q, k, v, grid, window, T, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    fused = settings.get("fwd_fused_prefix", tla.FWD_FUSED_PREFIX)
    default = tla._tile_plan(grid[0], grid[1], 1, 1, T if fused else 0, D, torch.float64, T if fused else 0)
    rows = settings.get("rows", 0)
    fits = rows and tla._cached_tile_plan(grid[0], grid[1], 1, 1, T if fused else 0, D, torch.float64,
                                          tla._MAX_TILE_SCORES, rows, T if fused else 0) is not None
    kernel, meta = launched[0]
    assert kernel is tla._local_attn_fwd_tiled_kernel
    assert meta["FUSE_PREFIX"] == fused
    assert meta["EARLY_V"] == (settings.get("fwd_early_v", tla.FWD_EARLY_V) and D <= default.block_dc)
    assert meta["num_warps"] == (settings.get("fwd_num_warps") or default.fwd_num_warps if fits or not rows
                                 else default.fwd_num_warps)
    assert meta["STAGES"] == (settings.get("stages") or default.stages if fits or not rows else default.stages)
    if rows and not fits:
        assert meta["BLOCK_Q"] == default.block
    dq_kernel = [m for kern, m in launched if kern is tla._local_attn_bwd_dq_tiled_kernel]
    assert dq_kernel[0]["FUSE_PREFIX"] == settings.get("bwd_fused_prefix", tla.BWD_FUSED_PREFIX)
    # The backward keeps the default tile plan.
    assert dq_kernel[0]["BLOCK_Q"] == tla._tile_plan(grid[0], grid[1], 1, 1, T if dq_kernel[0]["FUSE_PREFIX"]
                                                     else 0, D, torch.float64,
                                                     T if dq_kernel[0]["FUSE_PREFIX"] else 0).block


def test_tile_rows_are_used_where_they_fit(monkeypatch):
    launched = _recording(monkeypatch, tla)
    q, k, v = _qkv(1, 1, 1 + 7 * 6, 8, seed=1)
    with tuning.override(local_attention={"rows": 3}):
        out, _ = tla.local_attn_fwd(q, k, v, 7, 6, 3, 1, False, 8 ** -0.5)
    plan = tla._cached_tile_plan(7, 6, 1, 1, 0, 8, torch.float64, tla._MAX_TILE_SCORES, 3, 0)
    assert plan.rows == 3 and plan.rows != tla._tile_plan(7, 6, 1, 1, 0, 8, torch.float64).rows
    assert launched[0][1]["BLOCK_Q"] == plan.block
    ref, _ = _attention_reference(q, k, v, (7, 6), 3, 1, torch.zeros_like(q))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def _prompt_add_inputs(B, N, C, r, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)

    return dict(target=rnd(B, N, C), message=rnd(B, N, C), norm_weight=rnd(C), norm_bias=rnd(C),
                down_weight=rnd(r, C, s=0.3), down_bias=rnd(r), up_weight=rnd(C, r, s=0.3), up_bias=rnd(C),
                deep=rnd(1, N, C), deep_scale=rnd(C))


@pytest.mark.parametrize("settings", [
    {"block_m": 32, "block_c": 32, "num_warps": 2},
    {"fwd_one_pass": False, "bwd_from_z": False, "bwd_finalize_kernel": False},
    {"block_c": -1},  # whole rows: their tiles do not fit _WIDE_SHARED here, so the default chunks
], ids=["blocks", "three-pass", "whole-rows-too-big"])
def test_prompt_add_launchers_follow_the_settings(settings, monkeypatch):
    import sa2vp_kernels as sk
    from sa2vp_kernels.reference import prompt_add_reference

    # Rows of 40 channels in chunks of 16 (as tests/test_prompt_add.py's wide_triton), so the interpreter
    # runs the chunked kernels at a small shape.
    monkeypatch.setattr(tpa, "_WIDE_SHARED", 0)
    monkeypatch.setattr(tpa, "_CHUNK_SHARED", 16 * 16 * 2)
    default = tpa._row_blocks(40, 3, torch.float64)
    assert default[1::3] == (16, True)
    launched = _recording(monkeypatch, tpa)
    t = _prompt_add_inputs(2, 5, 40, 3, seed=3)
    with tuning.override(prompt_add=settings):
        out = sk.prompt_add(t["target"], t["message"], 0.7, t["norm_weight"], t["norm_bias"], t["down_weight"],
                            t["down_bias"], t["up_weight"], t["up_bias"], deep=t["deep"], deep_scale=t["deep_scale"],
                            dropout_p=0.2, seed=4, backend="triton")
        grads = torch.autograd.grad(out, list(t.values()), torch.ones_like(out))
    t_ex = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    ref = prompt_add_reference(t_ex["target"], t_ex["message"], 0.7, t_ex["norm_weight"], t_ex["norm_bias"],
                               t_ex["down_weight"], t_ex["down_bias"], t_ex["up_weight"], t_ex["up_bias"],
                               t_ex["deep"], t_ex["deep_scale"], 0.2, 1e-6, 4)
    ref_grads = torch.autograd.grad(ref, list(t_ex.values()), torch.ones_like(ref))
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    for name, got, want in zip(t, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)

    kernels = [kern for kern, _ in launched]
    fwd = dict(launched)[tpa._fwd_wide_kernel]
    whole = settings.get("block_c") == -1
    assert fwd["BLOCK_M"] == (settings.get("block_m") or default[0])
    assert fwd["BLOCK_C"] == (default[1] if whole else settings.get("block_c") or default[1])
    assert fwd["num_warps"] == (settings.get("num_warps") or default[3])
    assert fwd["ONE_PASS"] == settings.get("fwd_one_pass", tpa.FWD_ONE_PASS)
    bwd = dict(launched)[tpa._bwd_rows_wide_kernel]
    assert (bwd["BLOCK_M"], bwd["BLOCK_C"], bwd["num_warps"]) == (default[0], default[1], default[3])
    assert bwd["FROM_Z"] == settings.get("bwd_from_z", tpa.BWD_FROM_Z)
    assert (tpa._bwd_finalize_kernel in kernels) == settings.get("bwd_finalize_kernel", tpa.BWD_FINALIZE_KERNEL)


def test_prompt_add_blocks_only_replace_chunked_defaults():
    cpu = torch.device("cpu")
    tuned = {"block_m": 32, "num_warps": 8, "block_c": 128}
    # float32 rows of 768 channels run whole by default: the tuned (16-bit) chunks do not apply.
    assert tpa._fwd_row_blocks(tuned, 768, 16, torch.float32, cpu) == tpa._row_blocks(768, 16, torch.float32)
    assert tpa._fwd_row_blocks(tuned, 768, 16, torch.bfloat16, cpu) == (32, 128, 16, 8, True)
    assert tpa._fwd_row_blocks({"block_c": -1, "num_warps": 8}, 768, 16, torch.bfloat16, cpu) == (16, 1024, 16, 8, False)
    assert tpa._fwd_row_blocks({}, 768, 16, torch.bfloat16, cpu) == tpa._row_blocks(768, 16, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_this_gpus_tuned_settings_match_the_references(monkeypatch):
    """The benchmark shapes in bfloat16 with this GPU's tuned settings (the package's file, or the one
    SA2VP_TRITON_TUNED names): errors against float32 references within 1.5x of the built-in
    defaults' (plus 1e-3)."""
    import sa2vp_kernels as sk
    from sa2vp_kernels.reference import local_cross_attention_vectorized, prompt_add_reference

    if tuning.active_file() is None:
        pytest.skip("no tuned settings for this GPU")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def err(x, ref):
        return ((x.float() - ref).norm() / ref.norm()).item()

    def attention_errors():
        out = {}
        for H, D in ((1, 768), (12, 64)):
            q, k, v = (torch.randn(8, H, 197, D, device=dev, generator=g).bfloat16().requires_grad_() for _ in range(3))
            go = torch.randn(q.shape, device=dev, generator=g).bfloat16()
            o = sk.local_cross_attention(q, k, v, (14, 14), backend="triton")
            gq = torch.autograd.grad(o, (q, k, v), go)
            qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
            ref = local_cross_attention_vectorized(qf, kf, vf, (14, 14), 3, 1, "clip", D ** -0.5)
            rg = torch.autograd.grad(ref, (qf, kf, vf), go.float())
            out[(H, D)] = (err(o, ref), max(err(a, b) for a, b in zip(gq, rg)))
        return out

    def prompt_add_errors():
        C, r = 768, 16
        ts = [torch.randn(*s, device=dev, generator=g) for s in
              ((8, 197, C), (8, 197, C), (C,), (C,), (r, C), (r,), (C, r), (C,))]
        ts[4] *= 0.05
        ts[6] *= 0.05
        bf = [t.bfloat16().requires_grad_() for t in ts]
        o = sk.prompt_add(bf[0], bf[1], 0.1, *bf[2:], backend="triton")
        go = torch.randn(o.shape, device=dev, generator=g).bfloat16()
        gm = torch.autograd.grad(o, bf[1], go)[0]
        f = [t.detach().float().requires_grad_() for t in bf]
        ref = prompt_add_reference(f[0], f[1], 0.1, *f[2:], None, None, 0.0, 1e-6, None)
        gref = torch.autograd.grad(ref, f[1], go.float())[0]
        return err(o.float() - f[0], (ref - f[0]).detach()), err(gm, gref)

    tuned_attn, tuned_pa = attention_errors(), prompt_add_errors()
    monkeypatch.setenv(tuning.ENV, "0")
    g.manual_seed(0)
    base_attn, base_pa = attention_errors(), prompt_add_errors()
    for key in base_attn:
        for got, want in zip(tuned_attn[key], base_attn[key]):
            assert got <= 1.5 * want + 1e-3, (key, tuned_attn[key], base_attn[key])
    for got, want in zip(tuned_pa, base_pa):
        assert got <= 1.5 * want + 1e-3, (tuned_pa, base_pa)


def test_show_tuning_lists_or_rejects_a_file(tmp_path, monkeypatch, capsys):
    from sa2vp_kernels.triton import show_tuning

    doc = _doc(local_attention=[{"max_head_dim": 64, "settings": {"fwd_early_v": True, "rows": 1}}])
    path = _write(tmp_path, doc)
    assert show_tuning.main([path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"tuned settings: {path} (float16/bfloat16 inputs)"
    assert out[1:] == ["  local_attention (max_head_dim 64): fwd_early_v=True, rows=1", "  prompt_add: the built-in defaults"]
    bad = _write(tmp_path, _doc(prompt_add=[{"settings": {"block_m": 3}}]), "bad.json")
    assert show_tuning.main([bad]) == 1
    assert "bad.json: prompt_add[0]: 'block_m' must be a power of two, got 3" in capsys.readouterr().err
    monkeypatch.setenv(tuning.ENV, "off")
    assert show_tuning.main([]) == 0
    assert capsys.readouterr().out.strip() == "no tuned settings in force (SA2VP_TRITON_TUNED=off): the built-in defaults"
    monkeypatch.setenv(tuning.ENV, path)
    assert show_tuning.main([]) == 0
    assert capsys.readouterr().out.startswith(f"tuned settings: {path}")
