"""The SA2VP model: fused backends against the unfused reference, both against a naive model written
straight from the specification, parameter accounting, batch-1 prompt pathway, checkpoints, training."""
import os

import pytest
import torch

import sa2vp
import sa2vp_kernels
from naive_sa2vp import NaiveSA2VP
from sa2vp_kernels._dispatch import resolve_backend
from timm.models.vision_transformer import VisionTransformer

GRID_IMG = (32, 40)  # 4 x 5 tokens with patch 8
OPS = ("local_attn_fwd", "prompt_map_fwd", "prompt_add_fwd")


def tiny_backbone(img_size=GRID_IMG, **kw):
    kw = {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 0, **kw}
    return VisionTransformer(img_size=img_size, **kw)


def randomize(model, seed=0, std=0.2):
    """Every weight (backbone included) random, norms' scales around 1: no term of the model is negligible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_scale = n.split(".")[-2].startswith("norm") or n.endswith("gamma")
            p.copy_(1 + std * noise if is_scale and n.endswith(("weight", "gamma")) else std * noise)
    return model


def tiny_model(variant="paper", dtype=torch.float64, backbone=None, backbone_kw=None, **cfg):
    cfg = {"r": 4, "s": 0.7, "b2p_layers": (0, 2), "adapter_dropout": 0.0, "attn_dropout": 0.0,
           "backend": "reference", **cfg}
    config = sa2vp.SA2VPConfig.from_variant(variant, **cfg)
    backbone = backbone if backbone is not None else tiny_backbone(**(backbone_kw or {}))
    return randomize(sa2vp.SA2VP(backbone, 5, config)).to(dtype)


def images(n=3, size=GRID_IMG, dtype=torch.float64, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n=3):
    return torch.arange(n) % 5


def require_backend(backend):
    if backend == "reference":
        return
    if not hasattr(sa2vp_kernels, "prompt_add"):
        pytest.skip("sa2vp_kernels.prompt_add is not available")
    if backend == "auto":
        return
    for op in OPS:
        try:
            resolve_backend(backend, torch.device("cpu"), op)
        except (RuntimeError, ValueError) as exc:
            pytest.skip(f"backend {backend!r} cannot run {op} here: {exc}")


def run(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    model.loss(out, y).backward()
    return out, {n: p.grad.clone() for n, p in model.trainable_parameters()}


def assert_close(actual, expected, tol, what=""):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"{what}: max error {err.item():.3g} > {tol:.1g} * {scale.item():.3g}"


def assert_same_run(run_a, run_b, tol):
    (out_a, grads_a), (out_b, grads_b) = run_a, run_b
    assert_close(out_a.logits, out_b[0], tol, "logits")
    assert_close(out_a.prompt_logits, out_b[1], tol, "prompt logits")
    assert set(grads_a) == set(grads_b)
    for name in grads_b:
        assert grads_b[name] is not None, name
        assert_close(grads_a[name], grads_b[name], tol, f"grad of {name}")


TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


# ------------------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", ["paper", "official-acc"])
@pytest.mark.parametrize("backend", ["cpu", "triton", "auto"])
def test_backend_matches_reference(backend, variant, dtype):
    require_backend(backend)
    n = 2 if backend == "triton" else 3
    model = tiny_model(variant, dtype, deep_layers=(2,)).train()  # dropout probabilities are 0
    x, y = images(n, dtype=dtype), labels(n)
    reference = run(model, x, y)
    fused = run(model.set_backend(backend), x, y)
    assert_same_run(fused, reference, TOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("variant", ["paper", "official-acc"])
def test_matches_naive_model(variant, backend):
    require_backend(backend)
    model = tiny_model(variant, backend=backend).train()
    naive = NaiveSA2VP(model).train()
    x, y = images(), labels()
    out, grads = run(model, x, y)
    out_naive = naive(x)
    naive.loss(out_naive, y).backward()
    assert_same_run((out, grads), (out_naive, naive.grads_by_model_name()), 1e-10)


@pytest.mark.parametrize("case", ["prompt_grid", "registers", "no_embed_class", "avg_pool_no_cls", "depth_9",
                                  "window_5"])
def test_matches_naive_model_variants(case):
    cfg, bkw = {}, {}
    if case == "prompt_grid":
        cfg = {"prompt_grid": (3, 7)}
    elif case == "registers":
        bkw = {"reg_tokens": 2, "img_size": (24, 48)}
    elif case == "no_embed_class":
        bkw = {"reg_tokens": 1, "no_embed_class": True}
    elif case == "avg_pool_no_cls":
        bkw = {"class_token": False, "global_pool": "avg"}
    elif case == "depth_9":
        bkw, cfg = {"depth": 9}, {"b2p_layers": None}
    elif case == "window_5":
        cfg = {"window": 5}
    model = tiny_model("paper", backbone_kw=bkw, **cfg).train()
    if case == "depth_9":
        assert sorted(model.b2p_layers) == [0, 4, 8] and sorted(model.deep_layers) == [4, 8]
    naive = NaiveSA2VP(model).train()
    size = bkw.get("img_size", GRID_IMG)
    x, y = images(size=size), labels()
    out, grads = run(model, x, y)
    out_naive = naive(x)
    naive.loss(out_naive, y).backward()
    assert_same_run((out, grads), (out_naive, naive.grads_by_model_name()), 1e-10)


def test_dynamic_image_size():
    model = tiny_model(backbone_kw={"dynamic_img_size": True}).eval()
    naive = NaiveSA2VP(model).eval()
    for size in (GRID_IMG, (48, 24), (16, 56)):
        x = images(2, size)
        with torch.no_grad():
            out, ref = model(x), naive(x)
        assert_close(out.logits, ref[0], 1e-10, f"logits at {size}")
        assert_close(out.prompt_logits, ref[1], 1e-10, f"prompt logits at {size}")
    with torch.no_grad():
        messages = model.p2b_messages(images(2, (48, 24)), 1)
    assert messages.shape == (2, 6, 3)


def test_self_attention_block_matches_timm():
    """The block recomputed from the shared q/k/v equals timm's Block (q/k norm, LayerScale)."""
    backbone = tiny_backbone(qk_norm=True, init_values=0.3)
    model = tiny_model("official-acc", backbone=backbone).eval()
    x = torch.randn(2, 21, 48, dtype=torch.float64)
    for blk in model.backbone.blocks:
        torch.testing.assert_close(model._block(blk, x, *model._qkv(blk, x)), blk(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_qk_norm_layerscale_backbone_fused(backend):
    require_backend(backend)
    model = tiny_model("official-acc", backbone_kw={"qk_norm": True, "init_values": 0.3}).train()
    x, y = images(), labels()
    reference = run(model, x, y)
    assert_same_run(run(model.set_backend(backend), x, y), reference, 1e-10)


# ------------------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("r", [8, 16])
def test_trainable_count_vit_base(r):
    model = sa2vp.SA2VP("vit_base_patch16_224", 10, sa2vp.SA2VPConfig(r=r))
    assert model.num_trainable(include_head=False) == 21339 * r + 31488
    assert model.num_trainable() == 21339 * r + 31488 + 768 * 10 + 10
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == model.num_trainable()


def test_trainable_parameters_follow_the_table():
    model = tiny_model(backbone_kw={"depth": 9}, b2p_layers=None)
    N, r, C = 1 + 4 * 5, 4, 48
    shapes = {n: tuple(p.shape) for n, p in model.trainable_parameters()}
    expected = {"prompt.embed": (N, r), "prompt.proj.weight": (C, r), "prompt.proj.bias": (C,),
                "head.weight": (5, C), "head.bias": (5,)}
    for i in (4, 8):
        expected.update({f"deep_prompts.{i}.embed": (N, r), f"deep_prompts.{i}.proj.weight": (C, r),
                         f"deep_prompts.{i}.proj.bias": (C,), f"deep_prompts.{i}.scale": (C,)})
    for i in range(9):
        expected.update({f"adapters.{i}.norm.weight": (C,), f"adapters.{i}.norm.bias": (C,),
                         f"adapters.{i}.down.weight": (r, C), f"adapters.{i}.down.bias": (r,),
                         f"adapters.{i}.up.weight": (C, r), f"adapters.{i}.up.bias": (C,)})
    assert shapes == expected
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = sa2vp.SA2VP(tiny_backbone(embed_dim=96, depth=9), 5, sa2vp.SA2VPConfig(r=32))
    emb = model.prompt.embed
    assert 0.018 < emb.std() < 0.022  # timm's trunc_normal_(std=0.02): cut at +-2 absolute, as the authors
    for lin in (model.prompt.proj, model.deep_prompts["4"].proj, model.adapters[3].down, model.adapters[3].up):
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound  # xavier uniform
        assert lin.bias.abs().max() < 1e-5
    assert 0.01 < model.deep_prompts["8"].scale.std() < 0.03
    assert torch.equal(model.adapters[0].norm.weight, torch.ones(96))
    assert torch.equal(model.adapters[0].norm.bias, torch.zeros(96))
    assert model.adapters[0].norm.eps == 1e-6


def test_frozen_backbone_gets_no_gradient():
    model = tiny_model().train()
    run(model, images(), labels())
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.trainable_parameters())


def test_loss_weights_and_prediction():
    model = tiny_model(loss_weights=(0.8, 0.2)).eval()
    x, y = images(), labels()
    out = model(x)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(model.loss(out, y), 0.8 * ce(out.logits, y) + 0.2 * ce(out.prompt_logits, y))
    assert isinstance(out, sa2vp.SA2VPOutput) and out[0] is out.logits
    assert not torch.allclose(out.logits, out.prompt_logits)


# ----------------------------------------------------------------------------- batch-1 prompt pathway
def _qkv_batches(model, x):
    calls = {i: [] for i in range(len(model.backbone.blocks))}
    hooks = [blk.attn.qkv.register_forward_hook(lambda m, inp, out, i=i: calls[i].append(inp[0].shape[0]))
             for i, blk in enumerate(model.backbone.blocks)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_batch_independent_work_runs_once():
    model = tiny_model(b2p_layers=(2,), deep_layers=(2,)).eval()
    calls = _qkv_batches(model, images(3))
    # base, prompt (still independent of the image up to block 2), deep prompt; then both per image
    assert calls == {0: [3, 1], 1: [3, 1], 2: [3, 1, 1], 3: [3, 3]}
    model = tiny_model(b2p_layers=(0, 2), deep_layers=(2,)).eval()
    assert _qkv_batches(model, images(3)) == {0: [3, 1], 1: [3, 3], 2: [3, 3, 1], 3: [3, 3]}


def test_stochastic_backbone_runs_prompts_per_image():
    backbone = tiny_backbone(proj_drop_rate=0.1)
    model = tiny_model(backbone=backbone, b2p_layers=(2,), deep_layers=(2,))
    assert _qkv_batches(model.train(), images(3)) == {0: [3, 3], 1: [3, 3], 2: [3, 3, 3], 3: [3, 3]}
    assert _qkv_batches(model.eval(), images(3))[2] == [3, 1, 1]


def test_dropout_is_active_in_training_only():
    model = tiny_model(adapter_dropout=0.3, attn_dropout=0.3)
    x = images(2)
    with torch.no_grad():
        a, b = model.train()(x).logits, model(x).logits
        c, d = model.eval()(x).logits, model(x).logits
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


# --------------------------------------------------------------------------------------- training
def test_adamw_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float32, adapter_dropout=0.1, attn_dropout=0.1).train()
    x, y = images(8, dtype=torch.float32), labels(8)
    opt = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-2, weight_decay=1e-4)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model.loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_p2b_messages():
    model = tiny_model(b2p_layers=(0, 2)).eval()
    x = images(2)
    m1 = model.p2b_messages(x, 1)
    assert m1.shape == (2, 4, 5) and (m1 > 0).all()
    with pytest.raises(ValueError, match="B2P"):
        model.p2b_messages(x, 2)
    with pytest.raises(ValueError, match="layer"):
        model.p2b_messages(x, 4)


def test_p2b_messages_are_the_added_message():
    model = tiny_model(b2p_layers=(0,)).eval()
    x = images(2)
    base = model._encode(x)[0]
    silent = tiny_model(b2p_layers=(0,)).eval()
    silent.load_state_dict(model.state_dict())
    silent.adapters[3].up.weight.data.zero_()
    silent.adapters[3].up.bias.data.zero_()
    # blocks after 3: none, so the final base pathway differs exactly by block 3's message
    diff = (base - silent._encode(x)[0])[:, 1:].norm(dim=-1).reshape(2, 4, 5)
    torch.testing.assert_close(model.p2b_messages(x, 3), diff, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SA2VP_SKIP_COMPILE") == "1", reason="SA2VP_SKIP_COMPILE=1")
def test_torch_compile_forward():
    require_backend("cpu")
    model = tiny_model(dtype=torch.float32, backend="cpu", backbone_kw={"depth": 2}, b2p_layers=(1,),
                       deep_layers=(1,)).eval()
    x = images(2, dtype=torch.float32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.prompt_logits, eager.prompt_logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ backbones
@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_tiny_patch16_224", {"depth": 2}, (48, 80)),
    ("vit_small_patch32_224", {"depth": 1}, (64, 96)),
    ("vit_small_patch8_224", {"depth": 1}, (24, 40)),
    ("vit_base_patch14_reg4_dinov2", {"depth": 1}, (42, 56)),
    ("vit_base_patch16_reg4_gap_256", {"depth": 1}, (48, 32)),
])
def test_timm_backbones_by_name(name, kwargs, size):
    model = sa2vp.SA2VP(name, 3, sa2vp.SA2VPConfig(r=2, backend="reference"), img_size=size, backbone_kwargs=kwargs)
    assert model.backbone_name == name
    out = model.eval()(torch.randn(2, 3, *size))
    assert out.logits.shape == out.prompt_logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all()


def test_large_backbone_parameter_shapes():
    model = sa2vp.SA2VP("vit_large_patch16_224", 4, variant="official-acc", backbone_kwargs={"depth": 2})
    assert model.cross_heads == 1 and model.cross_scale == 1024 ** -0.5
    assert model.prompt.embed.shape == (197, 16)


def test_variant_settings():
    paper = tiny_model("paper")
    acc = tiny_model("official-acc")
    assert (paper.cross_heads, paper.cross_scale, paper.config.border) == (3, 16 ** -0.5, "clip")
    assert (acc.cross_heads, acc.cross_scale, acc.config.border) == (1, 48 ** -0.5, "zero")


def test_unsupported_backbones():
    with pytest.raises(ValueError, match="patch dropout"):
        sa2vp.SA2VP(tiny_backbone(patch_drop_rate=0.1), 3)
    with pytest.raises(TypeError, match="VisionTransformer"):
        sa2vp.SA2VP(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="num_classes"):
        sa2vp.SA2VP(tiny_backbone(), 0)
    with pytest.raises(ValueError, match="cross_heads"):
        sa2vp.SA2VP(tiny_backbone(), 3, sa2vp.SA2VPConfig(cross_heads=5))
    with pytest.raises(ValueError, match="beyond the backbone's depth"):
        sa2vp.SA2VP(tiny_backbone(), 3, sa2vp.SA2VPConfig(b2p_layers=(0, 4)))


# ---------------------------------------------------------------------------------------- config
def test_config():
    cfg = sa2vp.SA2VPConfig.from_variant("official-acc", r=8, s=1.5, prompt_grid=[7, 7])
    assert (cfg.border, cfg.cross_heads, cfg.prompt_grid, cfg.variant()) == ("zero", 1, (7, 7), "official-acc")
    assert sa2vp.SA2VPConfig.from_dict(cfg.to_dict()) == cfg
    assert sa2vp.SA2VPConfig.from_json(cfg.to_json()) == cfg
    assert sa2vp.SA2VPConfig().layers(12) == ((0, 4, 8), (4, 8))
    assert sa2vp.SA2VPConfig().layers(24) == ((0, 4, 8, 12, 16, 20), (4, 8, 12, 16, 20))
    assert sa2vp.SA2VPConfig(deep_layers=(4,)).layers(12) == ((0, 4, 8), (4,))
    for bad in ({"r": 0}, {"window": 4}, {"border": "wrap"}, {"backend": "gpu"}, {"cross_heads": "all"},
                {"adapter_dropout": 1.0}, {"prompt_grid": (3,)}, {"b2p_layers": (0, 0)}, {"loss_weights": (1,)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sa2vp.SA2VPConfig(**bad)
    with pytest.raises(ValueError, match="deep_layers must be B2P"):
        sa2vp.SA2VPConfig(deep_layers=(5,)).layers(12)
    with pytest.raises(ValueError, match="variant"):
        sa2vp.SA2VPConfig.from_variant("fast")
    with pytest.raises(ValueError, match="unknown SA2VPConfig fields"):
        sa2vp.SA2VPConfig.from_dict({"rank": 3})
    with pytest.raises(ValueError, match="variant='official-acc'"):
        sa2vp.SA2VP(tiny_backbone(), 3, sa2vp.SA2VPConfig(), variant="official-acc")
    model = sa2vp.SA2VP(tiny_backbone(), 3, sa2vp.SA2VPConfig(border="zero", cross_heads=1), variant="official-acc")
    assert model.config.variant() == "official-acc"


# ----------------------------------------------------------------------------------- checkpoints
def _same_outputs(a, b, size=GRID_IMG):
    x = images(2, size, dtype=torch.float32)
    with torch.no_grad():
        oa, ob = a.eval()(x), b.eval()(x)
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.prompt_logits, ob.prompt_logits)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model("official-acc", torch.float32, prompt_grid=(3, 3), deep_layers=(2,))
    full = tmp_path / "full.safetensors"
    sa2vp.save_checkpoint(model, full, include_backbone=True, metadata={"epoch": "3"})
    loaded = sa2vp.load_checkpoint(full)
    assert loaded.config == model.config and loaded.num_classes == 5
    _same_outputs(loaded, model)

    slim = tmp_path / "slim.safetensors"
    sa2vp.save_checkpoint(model, slim)
    with pytest.raises(ValueError, match="pretrained_path"):
        sa2vp.load_checkpoint(slim)
    from safetensors.torch import save_file
    backbone_file = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(backbone_file))
    _same_outputs(sa2vp.load_checkpoint(slim, pretrained_path=backbone_file), model)
    backbone_pth = tmp_path / "backbone.pth"
    torch.save({"model": model.backbone.state_dict()}, backbone_pth)
    _same_outputs(sa2vp.load_checkpoint(slim, pretrained_path=backbone_pth), model)
    import copy
    _same_outputs(sa2vp.load_checkpoint(slim, backbone=copy.deepcopy(model.backbone)), model)
    with pytest.raises(ValueError, match="does not match"):
        sa2vp.load_checkpoint(slim, backbone=tiny_backbone(embed_dim=96))
    with pytest.raises(ValueError, match="pass one or the other"):
        sa2vp.load_checkpoint(full, pretrained_path=backbone_file)


def test_checkpoint_by_name_rebuilds_the_backbone(tmp_path):
    model = sa2vp.SA2VP("vit_tiny_patch16_224", 3, sa2vp.SA2VPConfig(r=2), img_size=(32, 48),
                        backbone_kwargs={"depth": 2, "reg_tokens": 1})
    path = tmp_path / "ck.safetensors"
    sa2vp.save_checkpoint(model, path, include_backbone=True)
    loaded = sa2vp.load_checkpoint(path)
    assert loaded.backbone_name == "vit_tiny_patch16_224" and loaded.num_prefix == 2
    _same_outputs(loaded, model, (32, 48))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        sa2vp.load_checkpoint(tmp_path / "absent.safetensors")
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an SA2VP checkpoint"):
        sa2vp.load_checkpoint(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        sa2vp.load_checkpoint(junk)
    model = tiny_model(dtype=torch.float32)
    sd = model.trainable_state_dict()
    with pytest.raises(ValueError, match="missing \\['head.bias'\\]"):
        model.load_trainable_state_dict({k: v for k, v in sd.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="prompt.embed"):
        model.load_trainable_state_dict({**sd, "prompt.embed": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="reserved"):
        sa2vp.save_checkpoint(model, tmp_path / "x.safetensors", metadata={"config": "{}"})


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit_missing.npz"):
        sa2vp.SA2VP(tiny_backbone(), 3, pretrained_path=tmp_path / "vit_missing.npz")
    bad_suffix = tmp_path / "weights.txt"
    bad_suffix.write_text("x")
    with pytest.raises(ValueError, match="unknown backbone weights format"):
        sa2vp.load_backbone_weights(tiny_backbone(), bad_suffix)
    wrong = tmp_path / "wrong.pth"
    torch.save(tiny_backbone(embed_dim=96).state_dict(), wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        sa2vp.load_backbone_weights(tiny_backbone(), wrong)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in tiny_backbone().state_dict().items() if "blocks.3" not in k}, partial)
    with pytest.raises(ValueError, match="missing.*blocks.3"):
        sa2vp.load_backbone_weights(tiny_backbone(), partial)
