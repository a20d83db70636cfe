"""The ``sa2vp`` command line: smoke runs per data layout, eval, show, presets, help, errors, the demo."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import sa2vp_kernels
from sa2vp import cli
from sa2vp import train as T
from sa2vp.presets import PRESETS, get_preset
from tinydata import TINY_VIT, make_fgvc, make_imagefolder, make_vtab


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _train(data, out, *extra):
    return cli.main(["train", "--data", data, "--output", out, *TINY_VIT, "--batch-size", "4", *extra])


def _run_or_exit(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("layout, mode", [("vtab", "train_val"), ("fgvc", "trainval_test"),
                                          ("imagefolder", "train_val")])
def test_train_then_eval_each_layout(tmp_path, capsys, one_thread, layout, mode):
    make = {"vtab": make_vtab, "fgvc": make_fgvc, "imagefolder": make_imagefolder}[layout]
    data, out = make(str(tmp_path / "data")), str(tmp_path / "run")
    assert _train(data, out, "--epochs", "1", "--mode", mode) == 0
    printed = capsys.readouterr().out
    split = "val" if mode == "train_val" else "test"
    assert f"data: {layout} " in printed and f"final {split} accuracy" in printed
    expected = {"last.pt", "final.safetensors", "run.json", "summary.json", "metrics.jsonl"}
    if mode == "train_val":
        expected |= {"best.pt", "best.safetensors"}
    assert expected <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files
    epochs = [r for r in _records(out) if r["event"] == "epoch"]
    assert len(epochs) == 1 and f"{split}_acc" in epochs[0] and np.isfinite(epochs[0]["loss"])
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    run = T.load_state(os.path.join(out, "last.pt"))["run"]
    assert run["data"]["format"] == layout and run["model"]["num_classes"] == 3
    assert run["data"]["family"] == ("vtab" if layout == "vtab" else "fgvc")

    # `sa2vp eval` on the exported model and on the training checkpoint reproduces the run's number.
    for ckpt in ("final.safetensors", "last.pt"):
        report = str(tmp_path / f"eval-{ckpt}.json")
        assert cli.main(["eval", os.path.join(out, ckpt), "--json", report, "--num-workers", "0",
                         "--no-progress"]) == 0
        with open(report) as f:
            result = json.load(f)
        assert result["split"] == split and result["n"] == summary["final"]["n"]
        assert result["acc"] == pytest.approx(summary["final"]["acc"])
        assert result["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-5)


@pytest.mark.skipif(not sa2vp_kernels.extension_available(), reason="needs the compiled CPU kernels")
def test_train_with_compiled_cpu_kernels(tmp_path, capsys, one_thread):
    # The default path on CPU (backend auto -> cpu kernels), backbone dropout on, deep prompts present.
    data, out = make_fgvc(str(tmp_path / "data")), str(tmp_path / "run")
    argv = ["train", "--data", data, "--output", out, *TINY_VIT, "--batch-size", "4", "--epochs", "1"]
    argv[argv.index("reference")] = "cpu"
    assert cli.main(argv) == 0, capsys.readouterr().err
    state = T.load_state(os.path.join(out, "last.pt"))
    assert state["run"]["model"]["sa2vp"]["backend"] == "cpu" and state["run"]["model"]["backbone_dropout"] == 0.1
    assert state["run"]["model"]["sa2vp"]["deep_layers"] in (None, [4])


def test_swin_backbone_train_eval_show(tmp_path, capsys, one_thread):
    data, out = make_vtab(str(tmp_path / "data")), str(tmp_path / "run")
    swin = ["--backbone", "swin_tiny_patch4_window7_224", "--backbone-kwargs", "depths=[1,1,2,1]", "embed_dim=16",
            "num_heads=[1,1,2,2]", "window_size=2", "--img-size", "32", "--inter-dim", "4", "--backend", "reference",
            "--num-workers", "0", "--no-progress", "--batch-size", "4", "--epochs", "1"]
    assert cli.main(["train", "--data", data, "--output", out, *swin]) == 0
    run = T.load_state(os.path.join(out, "last.pt"))["run"]
    assert run["model"]["sa2vp"]["stages"] == [2] and run["model"]["sa2vp"]["r"] == 4
    capsys.readouterr()
    assert cli.main(["eval", os.path.join(out, "last.pt"), "--num-workers", "0"]) == 0
    assert "val accuracy on val200.txt (3 images)" in capsys.readouterr().out
    png = str(tmp_path / "swin.png")
    assert cli.main(["show", os.path.join(out, "last.pt"), os.path.join(data, "images", "test", "c0_0.png"),
                     "-o", png]) == 0
    assert Image.open(png).size == (28, 22)
    # ViT-only flags are refused for Swin backbones.
    assert cli.main(["train", "--data", data, "--output", str(tmp_path / "bad"), *swin, "--deep-layers", "1"]) == 1
    assert "ViT-only settings" in capsys.readouterr().err


def test_show_writes_overlay_png(tmp_path, capsys, one_thread):
    data, out = make_vtab(str(tmp_path / "data")), str(tmp_path / "run")
    assert _train(data, out, "--epochs", "1") == 0
    image = os.path.join(data, "images", "test", "c1_0.png")
    png = str(tmp_path / "overlay.png")
    capsys.readouterr()
    assert cli.main(["show", os.path.join(out, "final.safetensors"), image, "-o", png, "--layer", "2"]) == 0
    assert "P2B block 2" in capsys.readouterr().out
    src, over = Image.open(image), Image.open(png)
    assert over.format == "PNG" and over.size == src.size and over.mode == "RGB"
    a = np.asarray(over, dtype=np.float32)
    b = np.asarray(src.convert("RGB"), dtype=np.float32)
    assert np.abs(a - b).mean() > 5  # the heat map is visible
    # The overlay follows the message norms: brighter heat where the map is larger (inferno is monotone).
    from sa2vp.cli import load_for_inference
    from sa2vp.show import preprocess

    model, _ = load_for_inference(os.path.join(out, "final.safetensors"))
    heat = model.eval().p2b_messages(preprocess(src.convert("RGB"), (32, 32), (0.5,) * 3, (0.5,) * 3), 2)[0]
    assert heat.shape == (4, 4)
    luminance = torch.from_numpy((a - 0.45 * b).mean(-1))
    cells = torch.nn.functional.adaptive_avg_pool2d(luminance[None, None], (4, 4))[0, 0]
    hi, lo = np.unravel_index(int(heat.argmax()), (4, 4)), np.unravel_index(int(heat.argmin()), (4, 4))
    assert cells[hi] > cells[lo]
    # Default output name and the first P2B block; training checkpoints work too.
    assert cli.main(["show", os.path.join(out, "last.pt"), image]) == 0
    assert os.path.isfile(os.path.join(data, "images", "test", "c1_0_sa2vp.png"))
    assert "P2B block 1" in capsys.readouterr().out
    # A B2P block sends no message: a clear error.
    assert cli.main(["show", os.path.join(out, "last.pt"), image, "--layer", "0", "-o", png]) == 1
    assert "B2P block" in capsys.readouterr().err


def test_presets_resolve_and_override():
    parser = cli.build_parser()
    run = cli.resolve_run(parser.parse_args(["train", "--data", "x", "--preset", "pets"]))
    assert run["model"]["overrides"]["r"] == 8 and run["model"]["overrides"]["s"] == 0.1
    assert run["train"]["lr"] == 5e-4 and run["train"]["batch_size"] == 64
    run = cli.resolve_run(parser.parse_args(["train", "--data", "x", "--preset", "clevr_count", "--lr", "0.002",
                                             "--r", "4"]))
    assert run["train"]["lr"] == 0.002 and run["train"]["batch_size"] == 40
    assert run["model"]["overrides"]["r"] == 4 and run["model"]["overrides"]["s"] == 1.5
    run = cli.resolve_run(parser.parse_args(["train", "--data", "x"]))
    assert run["train"]["lr"] == 1e-3 and run["train"]["weight_decay"] == 1e-4 and run["train"]["epochs"] == 100
    assert run["train"]["min_lr"] == 1e-7 and run["train"]["warmup_epochs"] == 10
    assert run["data"]["mean"] == run["data"]["std"] == [0.5, 0.5, 0.5]
    table = {(p.r, p.s, p.batch_size) for p in PRESETS.values()}
    for row in [(16, 0.1, 64), (32, 0.1, 64), (8, 0.1, 64), (64, 1.5, 64), (16, 1.5, 40), (32, 1.5, 40),
                (64, 0.1, 64)]:
        assert row in table
    assert get_preset("vtab_natural") is PRESETS["vtab-natural"]
    with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
        get_preset("imagenet")


def test_cars_preset_keeps_one_deep_prompt():
    from sa2vp.weights import build_backbone

    vit = build_backbone("vit_tiny_patch16_224", dict(depth=9, embed_dim=32, num_heads=2, patch_size=8, img_size=32,
                                                      num_classes=0))
    run = cli.resolve_run(cli.build_parser().parse_args(["train", "--data", "x", "--preset", "cars"]))
    assert run["model"]["deep_prompts"] == 1
    cfg = T.sa2vp_config(run["model"], vit)
    assert cfg.layers(9) == ((0, 4, 8), (4,)) and cfg.r == 64 and cfg.s == 1.5


def test_help_documents_every_flag(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "eval", "show"):
        sub = subparsers.choices[name]
        for action in sub._actions:
            if action.option_strings:
                assert action.help, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in text, f"{name} --help does not show {opt}"
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "cars" in capsys.readouterr().out  # the presets table is part of train --help
    assert cli.main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)


def test_convert_official_is_forwarded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["convert-official", "--help"])
    assert exc.value.code == 0 and "--variant" in capsys.readouterr().out
    missing = str(tmp_path / "nope.pth")
    code = _run_or_exit(["convert-official", missing, str(tmp_path / "out.safetensors"), "--variant", "paper"])
    assert code != 0 and not os.path.exists(tmp_path / "out.safetensors")


@pytest.mark.parametrize("argv_tail, message", [
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--pretrained", "/no/such/weights.npz"], "/no/such/weights.npz does not exist"),
    (["--batch-size", "3", "--accum-steps", "2"], "must be divisible by world size 1 x --accum-steps 2"),
    (["--mode", "trainval_test", "--num-classes", "2"], "out of range for 2 classes"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, capsys, argv_tail, message):
    data = make_vtab(str(tmp_path / "data"))
    code = cli.main(["train", "--data", data, "--output", str(tmp_path / "run"), *TINY_VIT, "--epochs", "1",
                     *argv_tail])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_missing_list_file_and_bad_checkpoint(tmp_path, capsys):
    data = make_vtab(str(tmp_path / "data"))
    os.remove(os.path.join(data, "train800.txt"))
    assert _train(data, str(tmp_path / "run")) == 1
    assert "missing data file" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    assert cli.main(["train", "--resume", str(junk)]) == 1
    assert f"checkpoint {junk} cannot be read" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "none.safetensors"), "--data", data]) == 1
    assert "does not exist" in capsys.readouterr().err
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert cli.main(["eval", str(fake), "--data", data]) == 1
    assert "cannot be loaded" in capsys.readouterr().err


def test_eval_rejects_data_with_other_classes(tmp_path, capsys, one_thread):
    data, out = make_vtab(str(tmp_path / "data")), str(tmp_path / "run")
    assert _train(data, out, "--epochs", "1") == 0
    other = make_vtab(str(tmp_path / "other"), classes=4)
    capsys.readouterr()
    assert cli.main(["eval", os.path.join(out, "last.pt"), "--data", other, "--num-workers", "0"]) == 1
    assert "label 3 of" in (err := capsys.readouterr().err) and "out of range for 3 classes" in err


def test_demo_shortened_reaches_accuracy_bar(tmp_path, capsys):
    from sa2vp.demo import DemoSettings, demo

    out = str(tmp_path / "demo")
    result = demo(DemoSettings(pretrain_epochs=20, epochs=20), output=out, progress=False, echo=lambda *a: None)
    # Five classes (digits 5-9): chance is 20 %.  The full demo (60 epochs) reaches about 91-93 %.
    assert result["sa2vp_acc"] > 80.0
    assert result["linear_probe_acc"] > 70.0
    # The demo's run folder works with the other commands.
    assert {"backbone.safetensors", "example.png", "final.safetensors", "last.pt", "run.json"} <= set(os.listdir(out))
    assert cli.main(["show", os.path.join(out, "final.safetensors"), os.path.join(out, "example.png"),
                     "-o", str(tmp_path / "digit.png")]) == 0
    assert Image.open(tmp_path / "digit.png").size == (128, 128)


def test_pretrained_weights_are_used_and_checked(tmp_path, capsys, one_thread):
    from safetensors.torch import save_file

    from sa2vp.weights import build_backbone

    kwargs = dict(depth=5, embed_dim=32, num_heads=2, patch_size=8, mlp_ratio=2, img_size=32, num_classes=0)
    files = []
    for seed in (11, 12):
        torch.manual_seed(seed)
        vit = build_backbone("vit_tiny_patch16_224", kwargs)
        files.append(str(tmp_path / f"vit{seed}.safetensors"))
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, files[-1])
    data, out = make_vtab(str(tmp_path / "data")), str(tmp_path / "run")
    assert _train(data, out, "--epochs", "1", "--pretrained", files[0]) == 0
    from safetensors.torch import load_file

    from sa2vp.cli import load_for_inference

    model, _ = load_for_inference(os.path.join(out, "last.pt"))
    expected = load_file(files[0])
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[name]), name
    capsys.readouterr()
    # Another backbone file is refused at evaluation and at resume.
    assert cli.main(["eval", os.path.join(out, "last.pt"), "--pretrained", files[1], "--num-workers", "0"]) == 1
    assert "is not the backbone file" in capsys.readouterr().err
    os.replace(files[1], files[0])
    assert cli.main(["train", "--resume", os.path.join(out, "last.pt"), "--epochs", "1", "--no-progress"]) == 1
    assert "model.pretrained_fingerprint" in capsys.readouterr().err
