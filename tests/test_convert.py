"""Conversion of the authors' SA2VP checkpoints, and backbone weights from Google's ViT .npz format.

The authors' state dicts are synthesised here from the specification of their code (a jeonsworld-style
ViT ``vit_base.transformer.*`` with the SA2VP parts, and ``class_head``), independently of the
converter's key table.
"""
import argparse

import numpy as np
import pytest
import torch

import sa2vp
from sa2vp import convert
from timm.models.vision_transformer import VisionTransformer

V = "vit_base.transformer."
WIDTH, HEADS, DEPTH = 48, 3, 9


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if n.endswith("norm.weight") or n.endswith("norm1.weight") or n.endswith("norm2.weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


def _model(variant, deep_layers=None, s=0.3):
    backbone = VisionTransformer(img_size=40, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                 num_classes=0)
    cfg = sa2vp.SA2VPConfig.from_variant(variant, r=5, s=s, deep_layers=deep_layers, backend="reference")
    model = sa2vp.SA2VP(backbone, 7, cfg)
    _randomize(model)
    return model.eval()


def authors_state_dict(model, *, n_scale_rows=2, n_proj=2, with_backbone=True):
    """The state dict of the authors' ``Dual_model`` holding the same weights as ``model``."""
    bb, C = model.backbone, model.backbone.embed_dim
    sd = {}
    if with_backbone:
        sd[V + "embeddings.patch_embeddings.weight"] = bb.patch_embed.proj.weight
        sd[V + "embeddings.patch_embeddings.bias"] = bb.patch_embed.proj.bias
        sd[V + "embeddings.position_embeddings"] = bb.pos_embed
        sd[V + "embeddings.cls_token"] = bb.cls_token
        sd[V + "encoder.encoder_norm.weight"] = bb.norm.weight
        sd[V + "encoder.encoder_norm.bias"] = bb.norm.bias
    sd[V + "embeddings.ppt"] = model.prompt.embed[None]
    sd[V + "embeddings.ppt_proj.weight"] = model.prompt.proj.weight
    sd[V + "embeddings.ppt_proj.bias"] = model.prompt.proj.bias
    for i, blk in enumerate(bb.blocks):
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        frozen = {
            "attention_norm": (blk.norm1.weight, blk.norm1.bias),
            "q": (w[:C], b[:C]), "k": (w[C:2 * C], b[C:2 * C]), "v": (w[2 * C:], b[2 * C:]),
            "out": (blk.attn.proj.weight, blk.attn.proj.bias),
        }
        layer, cross = f"{V}encoder.layer.{i}.", f"{V}encoder.cross_attn.{i}."
        for suffix, idx in (("weight", 0), ("bias", 1)):
            if with_backbone:
                sd[f"{layer}attention_norm.{suffix}"] = frozen["attention_norm"][idx]
                sd[f"{layer}attn.query.{suffix}"] = frozen["q"][idx]
                sd[f"{layer}attn.key.{suffix}"] = frozen["k"][idx]
                sd[f"{layer}attn.value.{suffix}"] = frozen["v"][idx]
                sd[f"{layer}attn.out.{suffix}"] = frozen["out"][idx]
                sd[f"{layer}ffn_norm.{suffix}"] = getattr(blk.norm2, suffix)
                sd[f"{layer}ffn.fc1.{suffix}"] = getattr(blk.mlp.fc1, suffix)
                sd[f"{layer}ffn.fc2.{suffix}"] = getattr(blk.mlp.fc2, suffix)
            sd[f"{cross}attention_norm.{suffix}"] = frozen["attention_norm"][idx]
            sd[f"{cross}attn.to_q.{suffix}"] = frozen["q"][idx]
            sd[f"{cross}attn.to_k.{suffix}"] = frozen["k"][idx]
            sd[f"{cross}attn.to_v.{suffix}"] = frozen["v"][idx]
            sd[f"{cross}attn.to_out.{suffix}"] = frozen["out"][idx]
            sd[f"{cross}ffn_norm.{suffix}"] = getattr(model.adapters[i].norm, suffix)
            sd[f"{cross}ffn.fc1.{suffix}"] = getattr(model.adapters[i].down, suffix)
            sd[f"{cross}ffn.fc2.{suffix}"] = getattr(model.adapters[i].up, suffix)
    deep = [model.deep_prompts[str(i)] for i in sorted(model.deep_layers)]
    sd[V + "encoder.deep_ppt"] = torch.stack([d.embed[None] for d in deep])
    scales = [d.scale for d in deep] + [torch.zeros(C)] * (n_scale_rows - len(deep))
    sd[V + "encoder.cross_conv"] = torch.stack(scales)
    for j in range(n_proj):
        proj = deep[j].proj if j < len(deep) else torch.nn.Linear(model.config.r, C)
        sd[f"{V}encoder.deep_proj.{j}.weight"] = proj.weight
        sd[f"{V}encoder.deep_proj.{j}.bias"] = proj.bias
    sd["class_head.weight"] = model.head.weight
    sd["class_head.bias"] = model.head.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def _save_authors(tmp_path, sd, name="checkpoint-99.pth"):
    path = tmp_path / name
    args = argparse.Namespace(lr=1e-3, batch_size=64, data_set="CUB", nb_classes=7, opt_betas=None)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 99, "args": args}, path)
    return path


def write_vit_npz(vit, path):
    """``vit``'s weights in the original Google ViT .npz layout."""
    C, H = vit.embed_dim, vit.blocks[0].attn.num_heads
    d = C // H
    t = lambda x: x.detach().numpy()  # noqa: E731
    w = {
        "embedding/kernel": t(vit.patch_embed.proj.weight.permute(2, 3, 1, 0)),
        "embedding/bias": t(vit.patch_embed.proj.bias),
        "cls": t(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": t(vit.pos_embed),
        "Transformer/encoder_norm/scale": t(vit.norm.weight),
        "Transformer/encoder_norm/bias": t(vit.norm.bias),
    }
    for i, blk in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = t(blk.norm1.weight), t(blk.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = t(blk.norm2.weight), t(blk.norm2.bias)
        for j, n in enumerate(("query", "key", "value")):
            w[f"{mha}{n}/kernel"] = t(blk.attn.qkv.weight[j * C:(j + 1) * C].t().reshape(C, H, d))
            w[f"{mha}{n}/bias"] = t(blk.attn.qkv.bias[j * C:(j + 1) * C].reshape(H, d))
        w[mha + "out/kernel"] = t(blk.attn.proj.weight.reshape(C, H, d).permute(1, 2, 0))
        w[mha + "out/bias"] = t(blk.attn.proj.bias)
        for r, fc in enumerate((blk.mlp.fc1, blk.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = t(fc.weight.t())
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = t(fc.bias)
    np.savez(path, **w)


def _images(n=3, seed=1):
    return torch.randn(n, 3, 40, 40, generator=torch.Generator().manual_seed(seed))


def _assert_same_model(converted, model):
    ours, theirs = converted.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    x = _images()
    with torch.no_grad():
        a, b = converted.eval()(x), model(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.prompt_logits, b.prompt_logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "official-acc"])
def test_official_round_trip(tmp_path, variant):
    model = _model(variant)
    path = _save_authors(tmp_path, authors_state_dict(model))
    converted = sa2vp.load_official_checkpoint(path, variant, num_heads=HEADS, s=0.3).set_backend("reference")
    assert converted.config.variant() == variant
    assert converted.config.r == 5 and converted.num_classes == 7
    assert sorted(converted.deep_layers) == [4, 8] and sorted(converted.b2p_layers) == [0, 4, 8]
    _assert_same_model(converted, model)


def test_official_single_deep_prompt(tmp_path):
    """Stanford Cars: one deep prompt; their code still allocates two scale rows and two projections."""
    model = _model("paper", deep_layers=(4,))
    path = _save_authors(tmp_path, authors_state_dict(model))
    converted = sa2vp.load_official_checkpoint(path, "paper", num_heads=HEADS, s=0.3).set_backend("reference")
    assert sorted(converted.deep_layers) == [4]
    assert any("deep_proj.1" in note for note in converted.conversion_notes)
    assert any("cross_conv[1:]" in note for note in converted.conversion_notes)
    _assert_same_model(converted, model)


def test_convert_cli_and_our_checkpoint(tmp_path, capsys):
    model = _model("official-acc")
    src = _save_authors(tmp_path, authors_state_dict(model))
    out = tmp_path / "converted.safetensors"
    rc = convert.main([str(src), str(out), "--variant", "official-acc", "--num-heads", str(HEADS), "-s", "0.3",
                       "--num-classes", "7"])
    assert rc == 0
    assert "official-acc" in capsys.readouterr().out
    loaded = sa2vp.load_checkpoint(out).set_backend("reference")
    _assert_same_model(loaded, model)


def test_trainable_only_checkpoint_with_npz_backbone(tmp_path):
    model = _model("paper")
    npz = tmp_path / "ViT-tiny.npz"
    write_vit_npz(model.backbone, npz)
    path = _save_authors(tmp_path, authors_state_dict(model, with_backbone=False))
    with pytest.raises(ValueError, match="backbone_path"):
        sa2vp.load_official_checkpoint(path, "paper", num_heads=HEADS)
    converted = sa2vp.load_official_checkpoint(path, "paper", backbone_path=npz, num_heads=HEADS, s=0.3)
    _assert_same_model(converted.set_backend("reference"), model)


def test_npz_backbone_loader(tmp_path):
    source = VisionTransformer(img_size=(32, 40), patch_size=8, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                               num_classes=0)
    _randomize(source)
    npz = tmp_path / "vit.npz"
    write_vit_npz(source, npz)
    target = VisionTransformer(img_size=(32, 40), patch_size=8, embed_dim=WIDTH, depth=2, num_heads=HEADS,
                               num_classes=0)
    sa2vp.load_backbone_weights(target, npz)
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_official_checkpoint_with_matching_backbone_file(tmp_path):
    model = _model("paper")
    npz = tmp_path / "vit.npz"
    write_vit_npz(model.backbone, npz)
    path = _save_authors(tmp_path, authors_state_dict(model))
    sa2vp.load_official_checkpoint(path, "paper", backbone_path=npz, num_heads=HEADS, s=0.3)
    other = VisionTransformer(img_size=40, patch_size=8, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0)
    write_vit_npz(other, npz)
    with pytest.raises(ValueError, match="differs from"):
        sa2vp.load_official_checkpoint(path, "paper", backbone_path=npz, num_heads=HEADS)


@pytest.mark.parametrize("key", ["encoder.cross_attn.3.attn.to_k.weight", "encoder.cross_attn.0.attention_norm.bias",
                                 "encoder.cross_attn.8.attn.to_out.bias"])
def test_inconsistent_frozen_copy(tmp_path, key):
    model = _model("paper")
    sd = authors_state_dict(model)
    sd[V + key] = sd[V + key] + 1e-3
    path = _save_authors(tmp_path, sd)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*differs"):
        sa2vp.load_official_checkpoint(path, "paper", num_heads=HEADS)


def test_corrupted_checkpoints(tmp_path):
    model = _model("paper")
    good = authors_state_dict(model)

    sd = dict(good)
    del sd[V + "encoder.cross_attn.2.ffn_norm.weight"]
    with pytest.raises(ValueError, match="adapters.2.norm.weight"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, sd, "a.pth"), "paper", num_heads=HEADS)

    sd = dict(good)
    del sd[V + "encoder.layer.5.attn.key.bias"]
    with pytest.raises(ValueError, match="lacks the \\['k'\\]"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, sd, "b.pth"), "paper", num_heads=HEADS)

    sd = dict(good, **{V + "encoder.encoder_norm_2.weight": torch.ones(WIDTH)})
    with pytest.raises(ValueError, match="does not know.*encoder_norm_2"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, sd, "c.pth"), "paper", num_heads=HEADS)

    sd = dict(good)
    sd[V + "encoder.cross_attn.1.ffn.fc1.weight"] = torch.zeros(6, WIDTH)
    with pytest.raises(ValueError, match="adapters.1.down.weight"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, sd, "d.pth"), "paper", num_heads=HEADS)

    with pytest.raises(ValueError, match="num_classes=9"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, good, "e.pth"), "paper", num_classes=9, num_heads=HEADS)

    with pytest.raises(ValueError, match="not a standard ViT width"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, good, "f.pth"), "paper")

    with pytest.raises(ValueError, match="variant"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, good, "g.pth"), "fast", num_heads=HEADS)

    timm_sd = tmp_path / "timm.pth"
    torch.save(model.backbone.state_dict(), timm_sd)
    with pytest.raises(ValueError, match="not an SA2VP ViT checkpoint"):
        sa2vp.load_official_checkpoint(timm_sd, "paper")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read"):
        sa2vp.load_official_checkpoint(garbage, "paper")

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        sa2vp.load_official_checkpoint(tmp_path / "nowhere.pth", "paper")


def test_non_square_prompt_rejected(tmp_path):
    model = _model("paper")
    sd = authors_state_dict(model)
    sd[V + "embeddings.ppt"] = torch.zeros(1, 1 + 24, 5)
    sd[V + "embeddings.position_embeddings"] = torch.zeros(1, 1 + 24, WIDTH)
    with pytest.raises(ValueError, match="square"):
        sa2vp.load_official_checkpoint(_save_authors(tmp_path, sd), "paper", num_heads=HEADS)


def test_convert_cli_reports_errors(tmp_path, capsys):
    rc = convert.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors"), "--variant", "paper"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error" in err and "missing.pth" in err
    assert not (tmp_path / "out.safetensors").exists()
