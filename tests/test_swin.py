"""SA2VP on Swin: the shared-qkv block against timm's, fused backends against the unfused reference, both
against a naive model written straight from the specification, parameter accounting, batch-1 prompt
pathway, training, weights and backbone helpers."""
import json

import pytest
import torch

import sa2vp
from naive_sa2vp_swin import NaiveSA2VPSwin
from sa2vp.swin import (
    SA2VPSwin,
    SA2VPSwinConfig,
    build_swin_backbone,
    describe_swin_backbone,
    is_swin_backbone,
    load_swin_weights,
)
from sa2vp_kernels._dispatch import resolve_backend
from timm.models.swin_transformer import SwinTransformer

# Patch grid 20 x 26; stage grids 20 x 26, 10 x 13, 5 x 7, 3 x 4.  With window 4 the third stage (5 x 7)
# has shifted windows in both directions and is padded to 8 x 8; the last stage's window is clipped.
GRID_IMG = (80, 104)
OPS = ("local_attn_fwd", "prompt_map_fwd", "prompt_add_fwd")
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def tiny_swin(img_size=GRID_IMG, **kw):
    kw = {"patch_size": 4, "embed_dim": 16, "depths": (1, 1, 3, 1), "num_heads": (1, 2, 2, 4), "window_size": 4,
          "drop_path_rate": 0.0, "num_classes": 0, **kw}
    return SwinTransformer(img_size=img_size, **kw)


def randomize(model, seed=0, std=0.2):
    """Every weight (backbone included) random, norms' scales around 1: no term of the model is negligible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_scale = n.split(".")[-2].startswith("norm") and n.endswith("weight")
            p.copy_(1 + std * noise if is_scale else std * noise)
    return model


def tiny_model(dtype=torch.float64, backbone=None, backbone_kw=None, **cfg):
    cfg = {"r": 4, "s": 0.7, "b2p_blocks": (0, 2), "adapter_dropout": 0.0, "attn_dropout": 0.0,
           "backend": "reference", **cfg}
    backbone = backbone if backbone is not None else tiny_swin(**(backbone_kw or {}))
    return randomize(SA2VPSwin(backbone, 5, SA2VPSwinConfig(**cfg))).to(dtype)


def images(n=3, size=GRID_IMG, dtype=torch.float64, seed=1):
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels(n=3):
    return torch.arange(n) % 5


def require_backend(backend):
    if backend in ("reference", "auto"):
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


def run_naive(model, x, y):
    naive = NaiveSA2VPSwin(model).train(model.training)
    out = naive(x)
    naive.loss(out, y).backward()
    return out, naive.grads_by_model_name()


def assert_close(actual, expected, tol, what=""):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual - expected).abs().max()
    assert err <= tol * scale, f"{what}: max error {err.item():.3g} > {tol:.1g} * {scale.item():.3g}"


def assert_same_run(run_a, run_b, tol):
    (out_a, grads_a), (out_b, grads_b) = run_a, run_b
    assert_close(out_a[0], out_b[0], tol, "logits")
    assert_close(out_a[1], out_b[1], tol, "prompt logits")
    assert set(grads_a) == set(grads_b)
    for name in grads_b:
        assert grads_b[name] is not None, name
        assert_close(grads_a[name], grads_b[name], tol, f"grad of {name}")


# ------------------------------------------------------------------------------ the frozen blocks
@pytest.mark.parametrize("case,kw,size", [
    ("window_4", {}, GRID_IMG),
    ("window_3", {"window_size": 3}, GRID_IMG),
    ("no_qkv_bias", {"qkv_bias": False}, GRID_IMG),
    ("head_dim", {"head_dim": 6}, GRID_IMG),
    ("always_partition", {"always_partition": True}, GRID_IMG),
    ("dynamic", {"dynamic_img_size": True}, (72, 40)),
])
def test_block_matches_timm(case, kw, size):
    """Every block recomputed from the shared ``qkv(norm1(x))`` equals timm's SwinTransformerBlock
    (shifted windows, attention masks, padding with the qkv bias, relative-position bias)."""
    model = tiny_model(backbone_kw={"depths": (1, 2, 3, 2), **kw}).eval()
    bb = model.backbone
    z = bb.patch_embed(images(2, size))
    shifted = padded = 0
    with torch.no_grad():
        for stage in bb.layers:
            z = stage.downsample(z)
            for blk in stage.blocks:
                H, W = z.shape[1:3]
                shifted += any(blk.shift_size)
                padded += H % blk.window_size[0] != 0 or W % blk.window_size[1] != 0
                expected = blk(z)
                torch.testing.assert_close(model._block(blk, z, model._qkv(blk, z)), expected, rtol=0, atol=1e-12)
                z = expected
    assert shifted and padded


# ------------------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", "triton", "auto"])
def test_backend_matches_reference(backend, dtype):
    require_backend(backend)
    n = 2 if backend == "triton" else 3
    model = tiny_model(dtype).train()  # dropout probabilities are 0
    x, y = images(n, dtype=dtype), labels(n)
    reference = run(model, x, y)
    fused = run(model.set_backend(backend), x, y)
    assert_same_run(fused, reference, TOL[dtype])


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("border", ["clip", "zero"])
def test_matches_naive_model(border, backend):
    model = tiny_model(backend=backend, border=border).train()
    x, y = images(), labels()
    assert_same_run(run(model, x, y), run_naive(model, x, y), 1e-10)


@pytest.mark.parametrize("case", ["default_pattern", "second_stage", "two_stages", "last_stage", "prompt_grid",
                                  "window_5", "window_3_backbone", "head_dim"])
def test_matches_naive_model_variants(case):
    cfg, bkw = {}, {}
    if case == "default_pattern":
        bkw, cfg = {"depths": (1, 1, 8, 1), "num_heads": (1, 2, 2, 2)}, {"b2p_blocks": None}
    elif case == "second_stage":
        cfg = {"stages": (1,), "b2p_blocks": (0,)}
    elif case == "two_stages":
        bkw, cfg = {"depths": (1, 2, 3, 1)}, {"stages": (1, 2), "b2p_blocks": (1,)}
    elif case == "last_stage":
        bkw, cfg = {"depths": (1, 1, 1, 3)}, {"stages": (3,), "b2p_blocks": (0, 2)}
    elif case == "prompt_grid":
        cfg = {"prompt_grid": (9, 31)}
    elif case == "window_5":
        cfg = {"window": 5}
    elif case == "window_3_backbone":
        bkw = {"window_size": 3, "qkv_bias": False}
    elif case == "head_dim":
        bkw = {"head_dim": 6}
    model = tiny_model(backbone_kw=bkw, **cfg).train()
    if case == "default_pattern":
        assert model.b2p_blocks == {2: frozenset({0, 6})}
    x, y = images(), labels()
    assert_same_run(run(model, x, y), run_naive(model, x, y), 1e-10)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_dynamic_image_size(backend):
    model = tiny_model(backend=backend, backbone_kw={"dynamic_img_size": True}).eval()
    naive = NaiveSA2VPSwin(model).eval()
    for size in (GRID_IMG, (72, 40), (48, 120)):
        x = images(2, size)
        with torch.no_grad():
            out, ref = model(x), naive(x)
        assert_close(out.logits, ref[0], 1e-10, f"logits at {size}")
        assert_close(out.prompt_logits, ref[1], 1e-10, f"prompt logits at {size}")
    with torch.no_grad():
        assert model.p2b_messages(images(2, (72, 40)), (2, 1)).shape == (2, 5, 3)


# ------------------------------------------------------------------------------------- parameters
def _expected_count(model):
    """From the spec: prompt map (H0 W0, r) + Linear(r, C0); per interacting block LN(C) + Linear(C, r) +
    Linear(r, C); no head."""
    r, C0 = model.config.r, model.backbone.embed_dim
    h, w = model.prompt_grid
    n = h * w * r + r * C0 + C0
    for i in model.config.stages:
        for blk in model.backbone.layers[i].blocks:
            C = blk.dim
            n += 2 * C + (C * r + r) + (r * C + C)
    return n


@pytest.mark.parametrize("name,r,expected,width", [
    ("swin_base_patch4_window7_224", 8, 201_488, 1024),   # 21,714 r + 27,776 (the authors' Swin-B setting)
    ("swin_base_patch4_window7_224", 16, 375_200, 1024),
    ("swin_tiny_patch4_window7_224", 8, 69_776, 768),     # 7,846 r + 7,008
    ("swin_small_patch4_window7_224", 8, 157_424, 768),   # 17,074 r + 20,832
])
def test_trainable_count(name, r, expected, width):
    with torch.device("meta"):
        model = SA2VPSwin(name, 10, SA2VPSwinConfig(r=r))
    assert model.prompt.embed.shape == (56 * 56, r)
    assert model.num_trainable(include_head=False) == _expected_count(model) == expected
    assert model.num_trainable() == expected + width * 10 + 10
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == model.num_trainable()
    depth = len(model.backbone.layers[2].blocks)
    assert model.b2p_blocks == {2: frozenset(range(0, depth, 6))}


def test_trainable_parameters_follow_the_spec():
    model = tiny_model(backbone_kw={"depths": (1, 2, 3, 1)}, stages=(1, 2), b2p_blocks=(0,))
    r, (h, w), C0 = 4, (20, 26), 16
    shapes = {n: tuple(p.shape) for n, p in model.trainable_parameters()}
    expected = {"prompt.embed": (h * w, r), "prompt.proj.weight": (C0, r), "prompt.proj.bias": (C0,),
                "head.weight": (5, 128), "head.bias": (5,)}
    for stage, C, depth in ((1, 32, 2), (2, 64, 3)):
        for j in range(depth):
            p = f"adapters.{stage}.{j}."
            expected.update({p + "norm.weight": (C,), p + "norm.bias": (C,), p + "down.weight": (r, C),
                             p + "down.bias": (r,), p + "up.weight": (C, r), p + "up.bias": (C,)})
    assert shapes == expected
    assert model.num_trainable(include_head=False) == _expected_count(model)
    assert all(not p.requires_grad for p in model.backbone.parameters())


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    model = SA2VPSwin(tiny_swin(), 5, SA2VPSwinConfig(r=16))
    assert 0.018 < model.prompt.embed.std() < 0.022
    for lin in (model.prompt.proj, model.adapters["2"][1].down, model.adapters["2"][1].up):
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound  # xavier uniform
        assert lin.bias.abs().max() < 1e-5
    assert torch.equal(model.adapters["2"][0].norm.weight, torch.ones(64))
    assert torch.equal(model.adapters["2"][0].norm.bias, torch.zeros(64))
    assert model.adapters["2"][0].norm.eps == 1e-6
    assert 0.01 < model.head.weight.std() < 0.03


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
def _norm1_batches(model, x):
    """Batch of every ``norm1`` call, per (stage, block), in call order."""
    calls = {b: [] for b in model.block_ids}
    hooks = [blk.norm1.register_forward_hook(lambda m, inp, out, b=(si, j): calls[b].append(inp[0].shape[0]))
             for si, stage in enumerate(model.backbone.layers) for j, blk in enumerate(stage.blocks)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_batch_independent_work_runs_once():
    model = tiny_model(b2p_blocks=(1,)).eval()
    calls = _norm1_batches(model, images(3))
    # the prompt map runs with batch 1 until the first B2P block, (2, 1), adds an image-dependent message
    assert calls == {(0, 0): [3, 1], (1, 0): [3, 1], (2, 0): [3, 1], (2, 1): [3, 1], (2, 2): [3, 3],
                     (3, 0): [3, 3]}
    model = tiny_model(stages=(3,), b2p_blocks=()).eval()  # the prompt pathway never depends on the image
    assert all(c == [3, 1] for c in _norm1_batches(model, images(3)).values())
    out = model(images(3))
    assert out.prompt_logits.shape == (3, 5) and torch.equal(out.prompt_logits[0], out.prompt_logits[2])


def test_stochastic_backbone_runs_prompts_per_image():
    model = tiny_model(backbone=tiny_swin(drop_path_rate=0.1), b2p_blocks=(1,))
    assert all(c == [3, 3] for c in _norm1_batches(model.train(), images(3)).values())
    assert _norm1_batches(model.eval(), images(3))[(2, 0)] == [3, 1]


def test_dropout_is_active_in_training_only():
    model = tiny_model(adapter_dropout=0.3, attn_dropout=0.3)
    x = images(2)
    with torch.no_grad():
        a, b = model.train()(x).logits, model(x).logits
        c, d = model.eval()(x).logits, model(x).logits
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)


# --------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_adamw_steps_lower_the_loss(backend):
    torch.manual_seed(0)
    model = tiny_model(dtype=torch.float32, adapter_dropout=0.1, attn_dropout=0.1, backend=backend).train()
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
    model = tiny_model(backbone_kw={"depths": (2, 1, 3, 1)}).eval()
    x = images(2)
    assert model.p2b_blocks == [(2, 1)]
    m = model.p2b_messages(x, (2, 1))
    assert m.shape == (2, 5, 7) and (m > 0).all()
    torch.testing.assert_close(model.p2b_messages(x, 4), m, rtol=0, atol=0)  # flat index: 2 + 1 + 1
    with pytest.raises(ValueError, match="B2P"):
        model.p2b_messages(x, (2, 2))
    with pytest.raises(ValueError, match="outside the interaction stages"):
        model.p2b_messages(x, 0)
    with pytest.raises(ValueError, match="layer"):
        model.p2b_messages(x, 7)
    with pytest.raises(ValueError, match="layer"):
        model.p2b_messages(x, (1, 1))


def test_p2b_messages_are_the_added_message():
    """In the last block of the last stage, the message is exactly what the P2B block adds to the image."""
    kw = {"backbone_kw": {"depths": (1, 1, 1, 2)}, "stages": (3,), "b2p_blocks": (0,)}
    model = tiny_model(**kw).eval()
    silent = tiny_model(**kw).eval()
    silent.load_state_dict(model.state_dict())
    with torch.no_grad():
        silent.adapters["3"][1].up.weight.zero_()
        silent.adapters["3"][1].up.bias.zero_()
        x = images(2)
        diff = (model._encode(x)[0] - silent._encode(x)[0]).norm(dim=-1)
    torch.testing.assert_close(model.p2b_messages(x, (3, 1)), diff, rtol=1e-9, atol=1e-12)


def test_trainable_state_dict_round_trip():
    model = tiny_model().eval()
    other = tiny_model().eval()
    randomize(other, seed=5)
    other.backbone.load_state_dict(model.backbone.state_dict())
    x = images(2)
    assert not torch.allclose(model(x).logits, other(x).logits)
    other.load_trainable_state_dict(model.trainable_state_dict())
    torch.testing.assert_close(other(x).logits, model(x).logits, rtol=0, atol=0)
    state = model.trainable_state_dict()
    with pytest.raises(ValueError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(ValueError, match="shapes differ"):
        other.load_trainable_state_dict({**state, "head.bias": torch.zeros(7)})


# ---------------------------------------------------------------------------------------- config
def test_config():
    cfg = SA2VPSwinConfig()
    assert (cfg.r, cfg.s, cfg.stages, cfg.window, cfg.border, cfg.loss_weights) == (8, 0.5, (2,), 3, "clip", (0.8, 0.2))
    assert cfg.b2p(18) == (0, 6, 12) and cfg.b2p(6) == (0,)
    custom = SA2VPSwinConfig(r=16, s=1.5, stages=[2, 1], b2p_blocks=[3, 0], prompt_grid=[7, 9], backend="reference")
    assert custom.stages == (1, 2) and custom.b2p_blocks == (0, 3) and custom.prompt_grid == (7, 9)
    assert SA2VPSwinConfig.from_dict(custom.to_dict()) == custom
    assert SA2VPSwinConfig.from_json(custom.to_json()) == custom
    json.dumps(custom.to_dict())
    for bad in ({"r": 0}, {"window": 4}, {"border": "wrap"}, {"backend": "gpu"}, {"stages": ()},
                {"stages": (2, 2)}, {"b2p_blocks": (-1,)}, {"adapter_dropout": 1.0}, {"prompt_grid": (3,)},
                {"loss_weights": (1,)}, {"s": "big"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SA2VPSwinConfig(**bad)
    with pytest.raises(ValueError, match="beyond an interaction stage's depth"):
        SA2VPSwinConfig(b2p_blocks=(3,)).b2p(3)
    with pytest.raises(ValueError, match="unknown SA2VPSwinConfig fields"):
        SA2VPSwinConfig.from_dict({"rank": 3})


def test_unsupported_arguments():
    with pytest.raises(TypeError, match="SwinTransformer"):
        SA2VPSwin(torch.nn.Linear(2, 2), 3)
    with pytest.raises(ValueError, match="not a Swin Transformer"):
        SA2VPSwin("vit_tiny_patch16_224", 3)
    with pytest.raises(ValueError, match="num_classes"):
        SA2VPSwin(tiny_swin(), 0)
    with pytest.raises(TypeError, match="SA2VPSwinConfig"):
        SA2VPSwin(tiny_swin(), 3, sa2vp.SA2VPConfig())
    with pytest.raises(ValueError, match="beyond the backbone's 4 stages"):
        SA2VPSwin(tiny_swin(), 3, SA2VPSwinConfig(stages=(4,)))
    with pytest.raises(ValueError, match="beyond an interaction stage's depth"):
        SA2VPSwin(tiny_swin(), 3, SA2VPSwinConfig(b2p_blocks=(0, 3)))
    with pytest.raises(ValueError, match="backbone_kwargs"):
        SA2VPSwin(tiny_swin(), 3, backbone_kwargs={"depths": (1, 1, 1, 1)})


# ------------------------------------------------------------------------------------ backbones
def test_is_swin_backbone():
    for name in ("swin_base_patch4_window7_224", "swin_base_patch4_window7_224.ms_in22k", "swin_tiny_patch4_window7_224",
                 "swin_s3_tiny_224"):
        assert is_swin_backbone(name), name
    for name in ("vit_base_patch16_224", "swinv2_tiny_window8_256", "resnet50", "no_such_model"):
        assert not is_swin_backbone(name), name
    assert is_swin_backbone(tiny_swin())
    assert not is_swin_backbone(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="backbone"):
        is_swin_backbone(3)
    assert sa2vp.is_swin_backbone is is_swin_backbone and sa2vp.SA2VPSwin is SA2VPSwin


def test_backbone_by_name():
    kw = {"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 2, 4)}
    model = SA2VPSwin("swin_tiny_patch4_window7_224.ms_in1k", 3, SA2VPSwinConfig(r=2, backend="reference"),
                      img_size=(64, 96), backbone_kwargs=kw)
    assert model.backbone_name == "swin_tiny_patch4_window7_224.ms_in1k"
    assert model.prompt_grid == (16, 24) and model.b2p_blocks == {2: frozenset({0})}
    out = model.eval()(torch.randn(2, 3, 64, 96))
    assert out.logits.shape == out.prompt_logits.shape == (2, 3)
    assert torch.isfinite(out.logits).all()


def test_describe_rebuilds_the_backbone():
    for bb in (tiny_swin(head_dim=6, qkv_bias=False), tiny_swin(window_size=(3, 5), img_size=(48, 64)),
               tiny_swin(dynamic_img_size=True, mlp_ratio=2.0)):
        desc = describe_swin_backbone(bb)
        rebuilt = build_swin_backbone(None, json.loads(json.dumps(desc)))
        shapes = {k: v.shape for k, v in bb.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
        assert describe_swin_backbone(rebuilt) == desc
        rebuilt.load_state_dict(bb.state_dict())
        x = torch.randn(1, 3, *bb.patch_embed.img_size)
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(x), bb.eval()(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="SwinTransformer"):
        describe_swin_backbone(torch.nn.Linear(2, 2))


def _original_layout(state):
    """A timm Swin state dict in the Microsoft checkpoint layout (patch merging at the end of a stage)."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        k = ".".join(parts)
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("relative_position_bias_table"):
            out[k.replace("relative_position_bias_table", "relative_position_index")] = torch.zeros(3, dtype=torch.long)
    return {"model": out}


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "original"])
def test_load_weights(tmp_path, fmt):
    source = randomize(tiny_swin(num_classes=7), seed=3)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"swin.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(_original_layout(state) if fmt == "original" else state, str(path))
    model = SA2VPSwin(tiny_swin(), 3, SA2VPSwinConfig(r=2), pretrained_path=path)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_load_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_swin_weights(tiny_swin(), tmp_path / "missing.pth")
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="format"):
        load_swin_weights(tiny_swin(), bad)
    state = tiny_swin().state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if "layers.2" not in k}, str(partial))
    with pytest.raises(ValueError, match="missing"):
        load_swin_weights(tiny_swin(), partial)
    other = tmp_path / "other.pth"
    torch.save(tiny_swin(embed_dim=24).state_dict(), str(other))
    with pytest.raises(ValueError, match="do not fit"):
        load_swin_weights(tiny_swin(), other)


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(dtype=torch.float32, r=3, s=0.7).eval()
    path = tmp_path / "swin.safetensors"
    sa2vp.save_checkpoint(model, path, include_backbone=True)
    assert sa2vp.checkpoint.read_metadata(path)["model"] == "swin"
    loaded = sa2vp.load_checkpoint(path).eval()
    assert isinstance(loaded, sa2vp.SA2VPSwin)
    assert loaded.config == model.config
    x = images(2, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
        torch.testing.assert_close(loaded(x).prompt_logits, model(x).prompt_logits)
