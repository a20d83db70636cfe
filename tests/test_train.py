"""Training loop: schedule, parameter groups, atomic checkpoints, exact resume, 2-process DDP on gloo."""
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sa2vp import SA2VP, SA2VPConfig
from sa2vp import cli
from sa2vp import train as T
from sa2vp.weights import build_backbone
from tinydata import TINY_VIT, make_fgvc, make_vtab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Single-threaded torch: deterministic reductions and no thread oversubscription on small CI boxes."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_model(num_classes=3):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny_patch16_224", dict(depth=5, embed_dim=32, num_heads=2, patch_size=8, mlp_ratio=2,
                                                      img_size=32, num_classes=0))
    return SA2VP(vit, num_classes, SA2VPConfig(r=4, backend="reference"))


def test_warmup_cosine_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    lr, min_lr, warm, total = 1e-3, 1e-7, 4, 24
    sched = T.WarmupCosine(opt, lr, min_lr, warm, total)
    values = [sched.lr_at(s) for s in range(total + 1)]
    assert values[0] == pytest.approx(lr / warm)
    assert all(a < b for a, b in zip(values[:warm], values[1:warm]))           # linear rise
    assert values[warm - 1] == pytest.approx(lr) and values[warm] == pytest.approx(lr)
    assert all(a > b for a, b in zip(values[warm:total], values[warm + 1:total]))  # cosine fall
    assert values[warm + (total - warm) // 2] == pytest.approx((lr + min_lr) / 2)
    assert values[total] == pytest.approx(min_lr) and values[total - 1] > min_lr
    sched.step_num = 7
    assert sched.apply() == opt.param_groups[0]["lr"] == pytest.approx(values[7])
    fresh = T.WarmupCosine(opt, lr, min_lr, warm, total)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.step_num == 7
    no_warm = T.WarmupCosine(opt, lr, min_lr, 0, 10)
    assert no_warm.lr_at(0) == pytest.approx(lr)
    assert no_warm.lr_at(5) == pytest.approx(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi / 2)))


def test_param_groups_no_decay_on_biases_and_1d():
    model = tiny_model()
    decay, no_decay = T.param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    ids_decay = {id(p) for p in decay["params"]}
    ids_no = {id(p) for p in no_decay["params"]}
    named = dict(model.trainable_parameters())
    assert ids_decay | ids_no == {id(p) for p in named.values()} and not ids_decay & ids_no
    for name, p in named.items():
        expect_decay = p.ndim >= 2 and not name.endswith(".bias")
        assert (id(p) in ids_decay) == expect_decay, name
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    T.atomic_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        T.atomic_save({"a": torch.zeros(2), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]  # no temporary file left behind


def test_rng_state_round_trip():
    import random

    import numpy as np

    T.seed_everything(3)
    state = T.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    T.seed_everything(99)
    T.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_load_state_rejects_foreign_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(T.CheckpointError, match="cannot be read"):
        T.load_state(str(junk))
    other = tmp_path / "other.pt"
    torch.save({"model": {}}, other)
    with pytest.raises(T.CheckpointError, match="not a SA2VP training checkpoint"):
        T.load_state(str(other))
    with pytest.raises(T.CheckpointError, match="does not exist"):
        T.load_state(str(tmp_path / "nope.pt"))


def _train_args(data, out, *extra):
    return ["train", "--data", data, "--output", out, *TINY_VIT, *extra]


def _weights(path):
    return T.load_state(path)["model"]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    # FGVC layout: random crops and flips; default dropout everywhere: every RNG stream matters.
    data = make_fgvc(str(tmp_path / "data"), n_train=3, n_val=1)  # 9 train images -> steps of 4, 4, 1
    common = ["--epochs", "3", "--batch-size", "4", "--warmup-epochs", "1", "--eval-every", "1", "--seed", "7"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert cli.main(_train_args(data, full, *common)) == 0

    original = T.Trainer.after_step

    def killed_in_epoch_two(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 1 and self.step == 4:  # second step of the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "after_step", killed_in_epoch_two)
    assert cli.main(_train_args(data, cut, *common)) == 130
    state = T.load_state(os.path.join(cut, "last.pt"))
    assert (state["epoch"], state["step"]) == (1, 3)  # the unfinished epoch is lost, nothing else
    monkeypatch.setattr(T.Trainer, "after_step", original)

    assert cli.main(["train", "--resume", os.path.join(cut, "last.pt"), "--no-progress"]) == 0
    a, b = T.load_state(os.path.join(full, "last.pt")), T.load_state(os.path.join(cut, "last.pt"))
    assert (b["epoch"], b["step"]) == (3, 9)
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)
    assert a["last_eval"]["acc"] == b["last_eval"]["acc"]
    for name, value in load_file(os.path.join(full, "final.safetensors")).items():
        torch.testing.assert_close(load_file(os.path.join(cut, "final.safetensors"))[name], value, atol=1e-6, rtol=0)


def test_resume_rejects_other_config_and_keeps_checkpoint(tmp_path, capsys, one_thread):
    data = make_vtab(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    assert cli.main(_train_args(data, out, "--epochs", "1", "--batch-size", "3")) == 0
    last = os.path.join(out, "last.pt")
    before = open(last, "rb").read()
    capsys.readouterr()
    code = cli.main(["train", "--resume", last, "--r", "8", "--epochs", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert "written for another run" in err and "model.sa2vp" in err and "train.epochs" in err
    assert open(last, "rb").read() == before
    # A fresh run into the same folder is refused instead of replacing its checkpoints.
    code = cli.main(_train_args(data, out, "--epochs", "1", "--batch-size", "3"))
    assert code == 1 and "already holds a run" in capsys.readouterr().err
    assert open(last, "rb").read() == before


def test_unreadable_image_fails_without_touching_checkpoints(tmp_path, capsys, monkeypatch, one_thread):
    data = make_vtab(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    original = T.Trainer.after_step

    def killed_in_epoch_two(self, epoch, *args):
        original(self, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(T.Trainer, "after_step", killed_in_epoch_two)
    assert cli.main(_train_args(data, out, "--epochs", "2", "--batch-size", "3")) == 130
    monkeypatch.setattr(T.Trainer, "after_step", original)
    last = os.path.join(out, "last.pt")
    before = open(last, "rb").read()
    listing = sorted(os.listdir(out))
    with open(os.path.join(data, "train800.txt")) as f:
        victim = os.path.join(data, f.readline().split()[0])
    with open(victim, "wb") as f:
        f.write(b"this is not an image")
    capsys.readouterr()
    code = cli.main(["train", "--resume", last, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "cannot read image" in err and victim in err
    assert open(last, "rb").read() == before
    assert sorted(os.listdir(out)) == listing  # nothing written, no temporary file left


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo_matches_one_process(tmp_path, one_thread):
    # 12 training images, 6 per step: one process with micro-batch 6 or two with 3 each see the same
    # samples per step; without dropout or augmentation the averaged gradients agree.
    data = make_vtab(str(tmp_path / "data"), n_train=4, n_val=1, classes=3)
    common = ["--epochs", "2", "--batch-size", "6", "--warmup-epochs", "1", "--eval-every", "1", "--seed", "3",
              "--adapter-dropout", "0", "--attn-dropout", "0", "--backbone-dropout", "0", "--device", "cpu"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    assert cli.main(_train_args(data, single, *common)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sa2vp", *_train_args(data, multi, *common)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final val accuracy") == 1  # only rank 0 reports
    assert "device cpu x 2" in proc.stdout and "micro-batch 3" in proc.stdout
    a, b = T.load_state(os.path.join(single, "last.pt")), T.load_state(os.path.join(multi, "last.pt"))
    assert len(b["rng"]) == 2 and a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=2e-5, rtol=1e-4, msg=name)
    assert a["last_eval"]["n"] == b["last_eval"]["n"] == 3
    assert a["last_eval"]["acc"] == pytest.approx(b["last_eval"]["acc"])
    lines = open(os.path.join(multi, "metrics.jsonl")).read().splitlines()
    assert sum('"event": "epoch"' in line for line in lines) == 2  # one writer


def test_gradient_accumulation_matches_full_batch(tmp_path, one_thread):
    # 12 images, 6 per optimizer step: 2 micro-batches of 3 accumulate to the full-batch gradient.
    data = make_vtab(str(tmp_path / "data"), n_train=4, n_val=1)
    common = ["--epochs", "1", "--batch-size", "6", "--warmup-epochs", "0", "--seed", "5", "--adapter-dropout", "0",
              "--attn-dropout", "0", "--backbone-dropout", "0"]
    assert cli.main(_train_args(data, str(tmp_path / "full"), *common)) == 0
    assert cli.main(_train_args(data, str(tmp_path / "accum"), *common, "--accum-steps", "2")) == 0
    a, b = T.load_state(str(tmp_path / "full" / "last.pt")), T.load_state(str(tmp_path / "accum" / "last.pt"))
    assert a["step"] == b["step"] == 2
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=2e-6, rtol=1e-5, msg=name)
    # Stepping after every micro-batch instead would give different weights:
    assert cli.main(_train_args(data, str(tmp_path / "small"), *common[:2], "--batch-size", "3", *common[4:])) == 0
    c = T.load_state(str(tmp_path / "small" / "last.pt"))
    assert c["step"] == 4
    assert max((c["model"][n] - v).abs().max().item() for n, v in a["model"].items()) > 1e-4


def test_sampler_epoch_changes_order_and_is_reproducible():
    data = torch.utils.data.TensorDataset(torch.arange(20).float()[:, None], torch.zeros(20, dtype=torch.long))
    run = {"model": {"pretrained": None}, "train": {"epochs": 2, "amp": "fp32", "eval_every": 1, "save_every": 0,
                                                    "accum_steps": 1, "seed": 0, "batch_size": 20, "weight_decay": 0,
                                                    "lr": 1e-3, "min_lr": 0, "warmup_epochs": 0, "num_workers": 0}}
    trainer = T.Trainer(tiny_model(), data, None, run, T.DistInfo(), None, progress=False)

    def order(epoch):
        return [int(v) for x, _ in trainer._loader(epoch) for v in x[:, 0]]

    assert sorted(order(0)) == list(range(20))
    assert order(0) != order(1)
    assert order(1) == order(1)


def test_nan_loss_stops_without_saving_the_epoch(tmp_path, capsys, monkeypatch, one_thread):
    data = make_vtab(str(tmp_path / "data"))  # 6 training images: 2 steps per epoch
    out = str(tmp_path / "run")
    calls = {"n": 0}
    original = SA2VP.loss

    def loss_turning_nan(self, outputs, target):
        calls["n"] += 1
        value = original(self, outputs, target)
        return value * float("nan") if calls["n"] > 2 else value

    monkeypatch.setattr(SA2VP, "loss", loss_turning_nan)
    assert cli.main(_train_args(data, out, "--epochs", "3", "--batch-size", "3", "--eval-every", "1")) == 1
    assert "training loss became nan in epoch 2" in capsys.readouterr().err
    state = T.load_state(os.path.join(out, "last.pt"))
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not os.path.exists(os.path.join(out, "final.safetensors"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = f.readlines()[-1]
    assert '"event": "stopped"' in last and "NonFiniteLossError" in last


def test_resolve_amp():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert T.resolve_amp("auto", cpu) == "fp32" and T.resolve_amp("auto", cuda) == "bf16"
    assert T.resolve_amp("bf16", cpu) == "bf16" and T.resolve_amp("fp32", cpu) == "fp32"
    assert T.resolve_amp("fp16", cuda) == "fp16"
    with pytest.raises(ValueError, match="--amp fp16 needs a CUDA GPU"):
        T.resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        T.resolve_amp("fp8", cuda)


def test_bf16_autocast_on_cpu(tmp_path, capsys, one_thread):
    """--amp bf16 trains and evaluates under CPU autocast (through the fused CPU kernels when built: their
    16-bit inputs run the float32 kernels); the default stays fp32 on the CPU; fp16 is refused."""
    import sa2vp_kernels

    data = make_fgvc(str(tmp_path / "data"), n_train=2, n_val=1)
    backend = "cpu" if sa2vp_kernels.extension_available() else "reference"
    common = ["--epochs", "1", "--batch-size", "3", "--eval-every", "1", "--seed", "3"]
    runs = {}
    for amp in (None, "bf16"):
        out = str(tmp_path / f"run-{amp}")
        argv = _train_args(data, out, *common, *(["--amp", amp] if amp else []))
        argv[argv.index("reference")] = backend
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert f"precision {amp or 'fp32'}" in capsys.readouterr().out
        runs[amp] = T.load_state(os.path.join(out, "last.pt"))
        assert runs[amp]["run"]["train"]["amp"] == (amp or "fp32")
    weights32, weights16 = runs[None]["model"], runs["bf16"]["model"]
    assert all(torch.isfinite(v).all() for v in weights16.values())
    # the same run in bfloat16 matmuls: close to the float32 one, but not the same numbers
    assert any(not torch.equal(weights16[k], weights32[k]) for k in weights32)
    for k in weights32:
        torch.testing.assert_close(weights16[k], weights32[k], atol=0.05, rtol=0.05, msg=k)
    assert cli.main(["eval", str(tmp_path / "run-bf16" / "last.pt"), "--amp", "bf16", "--num-workers", "0",
                     "--no-progress"]) == 0
    assert "val accuracy" in capsys.readouterr().out

    code = cli.main(_train_args(data, str(tmp_path / "run-fp16"), *common, "--amp", "fp16"))
    assert code == 1 and "--amp fp16 needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_and_eval_on_gpu(tmp_path, capsys, amp):
    data = make_fgvc(str(tmp_path / "data"))
    out = str(tmp_path / "run")
    argv = _train_args(data, out, "--epochs", "2", "--batch-size", "4", "--amp", amp, "--eval-every", "1")
    argv[argv.index("reference")] = "auto"
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "device cuda" in printed and f"precision {amp}" in printed
    state = T.load_state(os.path.join(out, "last.pt"))
    assert state["epoch"] == 2 and (state["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert cli.main(["eval", os.path.join(out, "last.pt"), "--amp", amp, "--num-workers", "0"]) == 0
    assert "val accuracy on val.json (3 images)" in capsys.readouterr().out
