"""A self-contained SA2VP demo on real data, with no download: scikit-learn's handwritten digits.

1. Pretrain a tiny ViT (16 x 16 inputs, 2 x 2 patches, an 8 x 8 token grid) on digits 0-4.
2. Freeze it.  On digits 5-9 (a stratified train/test split), compare

   * a linear probe: a ridge classifier (penalty chosen by cross-validation) on the frozen
     backbone's CLS features, and
   * SA2VP: prompt maps, adapters and a head trained with the full recipe (AdamW, warmup + cosine,
     the 0.8 / 0.2 two-head loss) on the frozen backbone.

Both accuracies are measured on the same held-out test images, which neither saw in training.  The
digits are 8 x 8 grey images (values 0-16); they are upsampled to 16 x 16 and repeated over RGB.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["DemoSettings", "demo", "load_digit_tasks", "run_demo"]

BACKBONE = "vit_tiny_patch16_224"
BACKBONE_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4, "in_chans": 3}


class DemoSettings:
    """Knobs of the demo (the defaults are the ones ``sa2vp train`` runs)."""

    def __init__(self, seed: int = 0, pretrain_epochs: int = 20, epochs: int = 60, batch_size: int = 32,
                 lr: float = 3e-3, r: int = 8, s: float = 0.5, dropout: float = 0.0, backend: str = "auto",
                 test_fraction: float = 0.5, train_per_class: int | None = None, threads: int = 1):
        self.seed, self.pretrain_epochs, self.epochs = seed, pretrain_epochs, epochs
        self.batch_size, self.lr, self.r, self.s, self.dropout = batch_size, lr, r, s, dropout
        self.backend, self.test_fraction, self.train_per_class = backend, test_fraction, train_per_class
        # The matrices are tiny: one thread is as fast as two, and far faster on a busy machine.
        self.threads = threads


def load_digit_tasks(seed: int = 0, test_fraction: float = 0.5, train_per_class: int | None = None):
    """``(pretrain, train, test)`` tensors ``(images (n, 3, 16, 16) in [-1, 1], labels)``.

    Pretraining: every digit 0-4.  Transfer task: digits 5-9 relabelled 0-4, split per class.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # (n, 8, 8) in [0, 1]
    x = F.interpolate(x[:, None], size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(digits.target.astype(np.int64))
    pre = y < 5
    pretrain = (x[pre], y[pre])
    idx = np.flatnonzero(~pre.numpy())
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed,
                                           stratify=digits.target[idx])
    if train_per_class is not None:
        keep = []
        for c in range(5, 10):
            keep.extend([i for i in train_idx if digits.target[i] == c][:train_per_class])
        train_idx = np.array(sorted(keep))
    train = (x[train_idx], y[train_idx] - 5)
    test = (x[test_idx], y[test_idx] - 5)
    return pretrain, train, test


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation of every image by up to ``max_shift`` pixels, filling with background (-1)."""
    _, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def pretrain_backbone(images, labels, epochs: int, seed: int, echo=print):
    """Supervised training of a tiny ViT on ``images`` (full fine-tuning, AdamW + cosine)."""
    from .weights import build_backbone

    torch.manual_seed(seed)
    vit = build_backbone(BACKBONE, {**BACKBONE_KWARGS, "num_classes": int(labels.max()) + 1,
                                    "proj_drop_rate": 0.1})
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-3, weight_decay=0.05)
    n, bs = len(images), 32
    steps = epochs * ((n + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    vit.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = correct = 0.0
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            logits = vit(_shift(images[idx], 2, gen))
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(-1) == labels[idx]).sum().item()
        if (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
            echo(f"  pretrain epoch {epoch + 1}/{epochs}: loss {total / n:.4f}, train accuracy "
                 f"{100.0 * correct / n:.1f}% (shifted images, dropout on)")
    # The frozen copy used downstream: same weights, no dropout, no classifier.
    frozen = build_backbone(BACKBONE, {**BACKBONE_KWARGS, "num_classes": 0})
    frozen.load_state_dict({k: v for k, v in vit.state_dict().items() if not k.startswith("head.")})
    return frozen.eval()


@torch.no_grad()
def cls_features(vit, images, batch: int = 256) -> np.ndarray:
    vit.eval()
    return torch.cat([vit(images[i:i + batch]) for i in range(0, len(images), batch)]).numpy()


def linear_probe(vit, train, test) -> float:
    """Test accuracy (%) of a linear classifier on the frozen CLS features.

    Ridge-regression classifier on standardised features, its penalty chosen by leave-one-out
    cross-validation on the training images (on these features it beats logistic regression).
    """
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f_train, f_test = cls_features(vit, train[0]), cls_features(vit, test[0])
    probe = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 13)))
    probe.fit(f_train, train[1].numpy())
    return 100.0 * float((probe.predict(f_test) == test[1].numpy()).mean())


def demo(settings: DemoSettings | None = None, output: str | None = None, progress: bool = True,
         echo=print) -> dict:
    """Run the demo; returns the accuracies (%) and timings.  ``output``: folder for the run's files."""
    st = settings or DemoSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(st.threads)
    try:
        return _demo(st, output, progress, echo)
    finally:
        torch.set_num_threads(threads)


def _demo(st: DemoSettings, output: str | None, progress: bool, echo) -> dict:
    from safetensors.torch import save_file

    from . import train as T

    t0 = time.perf_counter()
    pretrain, train_split, test_split = load_digit_tasks(st.seed, st.test_fraction, st.train_per_class)
    size, grid = BACKBONE_KWARGS["img_size"], BACKBONE_KWARGS["img_size"] // BACKBONE_KWARGS["patch_size"]
    echo(f"digits: pretrain on 0-4 ({len(pretrain[1])} images); transfer to 5-9: {len(train_split[1])} train, "
         f"{len(test_split[1])} test images ({size}x{size}, {grid}x{grid} token grid)")
    echo(f"1/3 pretraining a tiny ViT ({BACKBONE_KWARGS['depth']} blocks, width {BACKBONE_KWARGS['embed_dim']}) "
         "on digits 0-4")
    vit = pretrain_backbone(*pretrain, epochs=st.pretrain_epochs, seed=st.seed, echo=echo)
    t_pre = time.perf_counter() - t0

    echo("2/3 linear probe on the frozen backbone (digits 5-9)")
    probe_acc = linear_probe(vit, train_split, test_split)
    echo(f"  linear probe test accuracy: {probe_acc:.2f}%")

    backbone_file = None
    if output is not None:
        os.makedirs(output, exist_ok=True)
        backbone_file = os.path.join(output, "backbone.safetensors")
        save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, backbone_file)
        example = ((test_split[0][0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().astype(np.uint8)
        from PIL import Image

        Image.fromarray(example).resize((128, 128), Image.NEAREST).save(os.path.join(output, "example.png"))

    echo(f"3/3 SA2VP on the frozen backbone (r {st.r}, s {st.s}, {st.epochs} epochs)")
    run = {
        "preset": "digits-demo",
        "model": {"backbone": BACKBONE, "backbone_kwargs": dict(BACKBONE_KWARGS), "img_size": size, "num_classes": 5,
                  "variant": "paper", "overrides": {"r": st.r, "s": st.s, "backend": st.backend,
                                                      "adapter_dropout": st.dropout, "attn_dropout": st.dropout},
                  "deep_prompts": None, "backbone_dropout": 0.0, "pretrained": backbone_file,
                  "pretrained_fingerprint": T.file_fingerprint(backbone_file), "sa2vp": None},
        "data": {"root": None, "format": "sklearn-digits", "mode": "trainval_test", "family": "vtab",
                 "mean": [0.5] * 3, "std": [0.5] * 3, "train_size": len(train_split[1]),
                 "class_names": [str(d) for d in range(5, 10)]},
        "train": {"epochs": st.epochs, "warmup_epochs": max(1, st.epochs // 10), "lr": st.lr, "min_lr": 1e-7,
                  "weight_decay": 1e-4, "batch_size": st.batch_size, "accum_steps": 1, "amp": "fp32",
                  "seed": st.seed, "clip_grad": None, "eval_every": max(1, st.epochs // 3), "save_every": 0,
                  "log_every": 10, "num_workers": 0, "eval_batch_size": 256, "tensorboard": False},
    }
    torch.manual_seed(st.seed)
    from .model import SA2VP

    model = SA2VP(vit, 5, T.sa2vp_config(run["model"], vit))
    run["model"]["sa2vp"] = model.config.to_dict()
    T.seed_everything(st.seed)
    trainer = T.Trainer(model, TensorDataset(*train_split), TensorDataset(*test_split), run, T.DistInfo(),
                        output, progress=progress, eval_name="test", select_best=False, echo=echo,
                        print_every=10)
    if output is not None:
        T.atomic_write_text(json.dumps(run, indent=2) + "\n", os.path.join(output, "run.json"))
    summary = trainer.fit()
    sa2vp_acc = summary["final"]["acc"]
    seconds = time.perf_counter() - t0
    echo("")
    echo(f"digits 5-9 test accuracy ({len(test_split[1])} images), frozen ViT pretrained on digits 0-4:")
    echo(f"  linear probe  {probe_acc:6.2f}%")
    echo(f"  SA2VP         {sa2vp_acc:6.2f}%   ({model.num_trainable():,} trainable parameters)")
    echo(f"total {seconds:.0f} s (pretraining {t_pre:.0f} s)")
    return {"linear_probe_acc": probe_acc, "sa2vp_acc": sa2vp_acc, "seconds": seconds,
            "pretrain_seconds": t_pre, "trainable_parameters": model.num_trainable()}


def run_demo(args) -> dict:
    """``sa2vp train`` without ``--data``: the digits demo (honours --seed, --epochs, --output, --backend)."""
    ignored = [flag for flag in ("preset", "pretrained", "backbone", "mode", "batch_size", "lr", "r", "s")
               if getattr(args, flag, None) is not None]
    if ignored:
        print(f"note: no --data given, running the digits demo; ignoring --{', --'.join(f.replace('_', '-') for f in ignored)}")
    settings = DemoSettings(seed=args.seed if args.seed is not None else 0,
                            epochs=args.epochs if args.epochs is not None else DemoSettings().epochs,
                            backend=args.backend or "auto")
    output = args.output or os.path.join("runs", f"digits-demo-{time.strftime('%Y%m%d-%H%M%S')}")
    from .train import prepare_output

    prepare_output(output, None, args.overwrite)
    result = demo(settings, output=output, progress=not args.no_progress)
    print(f"run folder: {output}  (try: sa2vp show {os.path.join(output, 'final.safetensors')} "
          f"{os.path.join(output, 'example.png')})")
    return result
