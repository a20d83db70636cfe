"""Command line: ``sa2vp train | eval | show | convert-official | presets``.

``sa2vp train`` without ``--data`` runs a self-contained demo on scikit-learn's handwritten digits (see
:mod:`sa2vp.demo`).  Multi-process training: ``torchrun --nproc_per_node N -m sa2vp train ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .presets import PRESETS, get_preset, preset_table

__all__ = ["main", "build_parser", "resolve_run"]

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
TRAIN_DEFAULTS = dict(epochs=100, warmup_epochs=10, lr=1e-3, min_lr=1e-7, weight_decay=1e-4, batch_size=64,
                      accum_steps=1, amp="auto", seed=42, clip_grad=None, eval_every=5, save_every=10,
                      log_every=10, eval_batch_size=None)
MODEL_DEFAULTS = dict(backbone=DEFAULT_BACKBONE, img_size=224, variant="paper", backbone_dropout=0.1)
# SA2VPConfig fields settable from the command line (None: the variant's default).
OVERRIDE_KEYS = ("r", "s", "window", "border", "cross_heads", "b2p_layers", "deep_layers", "prompt_grid",
                 "adapter_dropout", "attn_dropout", "loss_weights", "backend", "stages", "b2p_blocks")


class UsageError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------
# Argument types


def _layers(text: str):
    text = text.strip().lower()
    if text in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices like 0,4,8 or 'none', got {text!r}")


def _grid(text: str):
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected HxW like 14x14, got {text!r}")
    if len(parts) > 2 or h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW with positive sides like 14x14, got {text!r}")
    return (h, w)


def _floats(count: int):
    def parse(text: str):
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        if len(values) == 1 and count == 3:
            values = values * 3
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return tuple(values)

    return parse


def _heads(text: str):
    if text == "backbone":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'backbone' or a positive int, got {text!r}")
    return value


def _positive_int(text: str):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _kwarg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


# ----------------------------------------------------------------------------------------------------------
# Parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the presets table as written; defaults are stated in each flag's help."""


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (defaults: the preset, else the values shown)")
    g.add_argument("--backbone", help=f"timm ViT or Swin name (default {DEFAULT_BACKBONE})")
    g.add_argument("--backbone-kwargs", nargs="+", type=_kwarg, metavar="KEY=VALUE",
                   help="extra timm.create_model arguments, e.g. depth=4 embed_dim=64 patch_size=8 (JSON values)")
    g.add_argument("--pretrained", metavar="PATH",
                   help="backbone weights: timm .pth/.safetensors or the original ViT .npz (default: random "
                        "weights, useful for tests only)")
    g.add_argument("--img-size", type=_positive_int, help="input size (default 224); position embeddings "
                                                          "are resampled")
    g.add_argument("--variant", choices=("paper", "official-acc"),
                   help="paper: clipped 3x3 border, backbone heads; official-acc: zero border, one head "
                        "(default paper)")
    g.add_argument("--inter-dim", "--r", dest="r", type=_positive_int,
                   help="inter-dim r: prompt/adapter width (under torchrun spell it --inter-dim: torchrun "
                        "takes --r for one of its own flags)")
    g.add_argument("--inter-weight", "--s", dest="s", type=float,
                   help="inter-weight s: scale of the messages (under torchrun: --inter-weight)")
    g.add_argument("--window", type=_positive_int, help="odd cross-attention window side (default 3)")
    g.add_argument("--border", choices=("clip", "zero"), help="window border handling (default: the variant's)")
    g.add_argument("--cross-heads", type=_heads, help="'backbone' or number of cross-attention heads")
    g.add_argument("--b2p-layers", type=_layers, help="ViT: B2P blocks, e.g. 0,4,8 (default: i %% 4 == 0)")
    g.add_argument("--deep-layers", type=_layers, help="ViT: blocks with deep prompts, e.g. 4,8 or none "
                                                       "(default: B2P blocks without 0)")
    g.add_argument("--deep-prompts", type=_non_negative_int,
                   help="keep only the first N deep prompts (the 'cars' preset uses 1)")
    g.add_argument("--swin-stages", dest="stages", type=_layers,
                   help="Swin backbones: interaction stages, e.g. 2 (default: the third stage)")
    g.add_argument("--b2p-blocks", type=_layers,
                   help="Swin backbones: B2P block indices within each interaction stage (default: j %% 6 == 0)")
    g.add_argument("--prompt-grid", type=_grid, help="grid of the learned prompt maps, HxW (default: token grid)")
    g.add_argument("--adapter-dropout", type=float, help="dropout in the adapters (default 0.1)")
    g.add_argument("--attn-dropout", type=float, help="dropout on the cross-attention output (default 0.1)")
    g.add_argument("--backbone-dropout", type=float,
                   help="dropout inside the frozen backbone (projection and embedding dropout), as in the "
                        "authors' runs (default 0.1)")
    g.add_argument("--loss-weights", type=_floats(2), help="weights of the base and prompt losses (default 0.8,0.2)")
    g.add_argument("--backend", choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="kernel backend (default auto)")


def _add_data_flags(p: argparse.ArgumentParser, eval_mode: bool = False) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR",
                   help="dataset folder: VTAB-1k lists, FGVC json (VPT layout) or ImageFolder train/val/test"
                        + ("" if eval_mode else "; without it, `sa2vp train` runs the digits demo"))
    g.add_argument("--data-format", choices=("auto", "vtab", "fgvc", "imagefolder"), help="layout (default auto)")
    if not eval_mode:
        g.add_argument("--mode", choices=("train_val", "trainval_test"),
                       help="train_val: train on train800/train, select on val200/val; trainval_test: train on "
                            "train+val, report test (default train_val)")
    g.add_argument("--num-classes", type=_positive_int, help="classes (default: from the data)")
    g.add_argument("--transform", choices=("vtab", "fgvc"),
                   help="vtab: resize to a square; fgvc: resize, random crop, flip (default: by layout)")
    g.add_argument("--mean", type=_floats(3), help="normalisation mean, one or three values (default 0.5)")
    g.add_argument("--std", type=_floats(3), help="normalisation std, one or three values (default 0.5)")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): CUDA when available (torchrun: one device per process)")
    p.add_argument("--num-workers", type=_non_negative_int, help="data loader workers per process "
                                                                 "(default: min(8, CPUs per process))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa2vp",
        description="Train, evaluate and inspect SA2VP (spatially aligned-and-adapted visual prompts) on "
                    "frozen timm ViTs.",
        epilog="Multi-GPU: torchrun --nproc_per_node N -m sa2vp train ...   Run `sa2vp COMMAND --help` for "
               "the flags of each command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # train ---------------------------------------------------------------------------------------------
    t = sub.add_parser(
        "train", help="train SA2VP (without --data: the digits demo)", formatter_class=_Formatter,
        description=(
            "Train SA2VP on a dataset folder.  Without --data (and without --resume) it runs a self-contained "
            "demo on scikit-learn's digits: a tiny ViT pretrained on digits 0-4, frozen, then a linear probe "
            "and SA2VP trained on digits 5-9; both test accuracies are printed.\n\n"
            "Values come from, in order: the flags, the --preset, the checkpoint given to --resume, the "
            "defaults.  Presets:\n\n" + preset_table()
        ),
    )
    t.add_argument("--preset", metavar="NAME", help=f"authors' settings: {', '.join(PRESETS)}")
    t.add_argument("--output", metavar="DIR", help="run folder: checkpoints, metrics.jsonl, run.json "
                                                   "(default runs/<preset or data name>-<time>)")
    t.add_argument("--resume", metavar="CKPT",
                   help="continue from a training checkpoint (e.g. RUN/last.pt) at its next epoch; settings "
                        "not given as flags come from the checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output that holds a run: its checkpoints and logs are deleted")
    _add_data_flags(t)
    _add_model_flags(t)
    g = t.add_argument_group("optimisation (defaults: the preset, else the values shown)")
    g.add_argument("--epochs", type=_positive_int, help="epochs (default 100)")
    g.add_argument("--warmup-epochs", type=float, help="linear warmup epochs (default 10)")
    g.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine schedule (default 1e-7)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay, not on biases/1-D params (default 1e-4)")
    g.add_argument("--batch-size", type=_positive_int, help="images per optimizer step over all processes "
                                                            "(default 64)")
    g.add_argument("--accum-steps", type=_positive_int, help="gradient accumulation micro-steps (default 1)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32"),
                   help="precision: auto (default: bf16 on a GPU, fp32 on the CPU), bf16 autocast (on the CPU "
                        "too: faster where it has bfloat16 matrix units such as AMX), fp16 (GPU only, with a "
                        "GradScaler) or fp32")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm to this value (default off)")
    g.add_argument("--seed", type=int, help="seed of python, numpy and torch (default 42)")
    g.add_argument("--eval-every", type=_positive_int, help="evaluate every K epochs and at the end (default 5)")
    g.add_argument("--eval-batch-size", type=_positive_int, help="evaluation batch per process")
    g.add_argument("--save-every", type=_non_negative_int,
                   help="keep epoch_NNNN.pt every N epochs, 0: never (default 10); last.pt is written every epoch")
    g.add_argument("--log-every", type=_positive_int, help="log training metrics every N steps (default 10)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs even when installed")
    _add_runtime_flags(t)

    # eval ----------------------------------------------------------------------------------------------
    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset split", formatter_class=_Formatter,
                       description="Top-1 accuracy of a checkpoint (training .pt or exported .safetensors) on a "
                                   "split.  Data settings default to the checkpoint's run.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="RUN/best.pt, RUN/last.pt or a .safetensors model")
    _add_data_flags(e, eval_mode=True)
    e.add_argument("--split", choices=("val", "test", "train"),
                   help="split to score (default: the run's evaluation split)")
    e.add_argument("--pretrained", metavar="PATH", help="backbone weights (default: the run's)")
    e.add_argument("--img-size", type=_positive_int, help="input size (default: the checkpoint's)")
    e.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch per process (default 128)")
    e.add_argument("--amp", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="precision: auto (default: bf16 on a GPU, fp32 on the CPU), bf16, fp16 (GPU only) or fp32")
    e.add_argument("--backend", choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="kernel backend (default: the checkpoint's)")
    e.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    _add_runtime_flags(e)

    # show ----------------------------------------------------------------------------------------------
    s = sub.add_parser("show", help="overlay of how strongly each prompt token steers its region",
                       formatter_class=_Formatter,
                       description="Write a PNG: the input image overlaid with the norm of the message the prompt "
                                   "pathway adds to every image token at a P2B block (model.p2b_messages).")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="training .pt or exported .safetensors model")
    s.add_argument("image", metavar="IMAGE", help="input image")
    s.add_argument("--layer", type=int, help="P2B block index (default: the first P2B block)")
    s.add_argument("--output", "-o", metavar="PNG", help="output file (default IMAGE stem + _sa2vp.png)")
    s.add_argument("--pretrained", metavar="PATH", help="backbone weights (default: the run's)")
    s.add_argument("--img-size", type=_positive_int, help="input size (default: the checkpoint's)")
    s.add_argument("--alpha", type=float, default=0.55, help="opacity of the heat map (default 0.55)")
    s.add_argument("--cmap", default="inferno", help="matplotlib colour map (default inferno)")
    s.add_argument("--backend", choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="kernel backend (default: the checkpoint's)")
    s.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): CUDA when available")

    # convert-official ---------------------------------------------------------------------------------
    sub.add_parser("convert-official", add_help=False,
                   help="convert the authors' checkpoint: convert-official IN OUT --variant {paper,official-acc}",
                   description="Forwarded to sa2vp.convert (run `sa2vp convert-official --help`).")

    sub.add_parser("presets", help="list the training presets", formatter_class=_Formatter)
    return parser


# ----------------------------------------------------------------------------------------------------------
# Flags -> run dict


def _pick(*values):
    for v in values:
        if v is not None:
            return v
    return None


def _default_workers(world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus // max(world, 1) - 1))


def resolve_run(args, saved: dict | None = None) -> dict:
    """The run dict of ``sa2vp train`` flags: flag, else preset, else checkpoint, else default."""
    preset = get_preset(args.preset) if args.preset else None
    pv = preset.to_dict() if preset else {}
    sm = (saved or {}).get("model", {})
    sd = (saved or {}).get("data", {})
    st = (saved or {}).get("train", {})
    saved_over = sm.get("overrides") or {}

    overrides = {}
    for key in OVERRIDE_KEYS:
        value = _pick(getattr(args, key), pv.get(key) if key in ("r", "s") else None, saved_over.get(key))
        if value is not None:
            overrides[key] = list(value) if isinstance(value, tuple) else value
    kwargs = dict(args.backbone_kwargs or [])
    model = {
        "backbone": _pick(args.backbone, pv.get("backbone"), sm.get("backbone"), MODEL_DEFAULTS["backbone"]),
        "backbone_kwargs": kwargs if args.backbone_kwargs else (sm.get("backbone_kwargs") or {}),
        "img_size": _pick(args.img_size, sm.get("img_size"), MODEL_DEFAULTS["img_size"]),
        "num_classes": _pick(args.num_classes, sm.get("num_classes")),
        "variant": _pick(args.variant, sm.get("variant"), MODEL_DEFAULTS["variant"]),
        "overrides": overrides,
        "deep_prompts": _pick(args.deep_prompts, pv.get("deep_prompts"), sm.get("deep_prompts")),
        "backbone_dropout": _pick(args.backbone_dropout, sm.get("backbone_dropout"),
                                  MODEL_DEFAULTS["backbone_dropout"]),
        "pretrained": _pick(args.pretrained, sm.get("pretrained")),
        "sa2vp": None,
    }
    if model["pretrained"] and not os.path.isfile(model["pretrained"]):
        raise FileNotFoundError(f"--pretrained: {model['pretrained']} does not exist")
    from .train import file_fingerprint

    model["pretrained_fingerprint"] = file_fingerprint(model["pretrained"])
    data_root = _pick(args.data, sd.get("root"))
    if data_root is None:
        raise UsageError("--data is required")
    family = _pick(args.transform, sd.get("family"))
    data = {
        "root": os.path.abspath(data_root),
        "format": _pick(args.data_format, sd.get("format"), "auto"),
        "mode": _pick(args.mode, sd.get("mode"), "train_val"),
        "family": family,
        "mean": list(_pick(args.mean, sd.get("mean"), (0.5, 0.5, 0.5))),
        "std": list(_pick(args.std, sd.get("std"), (0.5, 0.5, 0.5))),
        "train_size": None,
    }
    if any(v <= 0 for v in data["std"]):
        raise UsageError(f"--std must be positive, got {data['std']}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train = {}
    for key, default in TRAIN_DEFAULTS.items():
        train[key] = _pick(getattr(args, key, None), pv.get(key), st.get(key), default)
    # Loader workers depend on the machine, not on the run: never taken from the checkpoint.
    train["num_workers"] = _pick(args.num_workers, _default_workers(world))
    train["tensorboard"] = not args.no_tensorboard
    for key in ("lr", "min_lr", "weight_decay", "warmup_epochs"):
        if train[key] < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0, got {train[key]}")
    if train["lr"] <= 0:
        raise UsageError(f"--lr must be > 0, got {train['lr']}")
    return {"preset": args.preset or (saved or {}).get("preset"), "model": model, "data": data, "train": train}


def _default_output(run: dict) -> str:
    name = run["preset"] or os.path.basename(run["data"]["root"].rstrip(os.sep)) or "run"
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


# ----------------------------------------------------------------------------------------------------------
# Commands


def _echo_main(*args, **kwargs):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def cmd_train(args) -> int:
    from . import train as T

    if args.data is None and args.resume is None:
        from .demo import run_demo

        run_demo(args)
        return 0
    saved_state = None
    if args.resume:
        saved_state = T.load_state(args.resume)
    run = resolve_run(args, saved_state["run"] if saved_state else None)
    output = args.output or (os.path.dirname(os.path.abspath(args.resume)) if args.resume else _default_output(run))
    T.prepare_output(output, args.resume, args.overwrite)
    T.run_train(run, output, resume_state=saved_state, resume_path=args.resume, progress=not args.no_progress,
                device=args.device, echo=_echo_main)
    _echo_main(f"run folder: {output}")
    return 0


def load_for_inference(path: str, pretrained: str | None = None, img_size: int | None = None,
                       backend: str | None = None):
    """Model and run dict (or None) of a training checkpoint (.pt) or an exported .safetensors model."""
    from . import train as T

    if not os.path.isfile(path):
        raise T.CheckpointError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        import sa2vp

        run = None
        run_json = os.path.join(os.path.dirname(os.path.abspath(path)), "run.json")
        if os.path.isfile(run_json):
            with open(run_json, encoding="utf-8") as f:
                run = json.load(f)
        pretrained = _pick(pretrained, (run or {}).get("model", {}).get("pretrained"))
        try:
            model = sa2vp.load_checkpoint(path, pretrained_path=pretrained or None)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise T.CheckpointError(f"checkpoint {path} cannot be loaded: {exc}") from None
        if img_size is not None:
            model.backbone.set_input_size(img_size=img_size)
        if backend is not None:
            model.config.backend = backend
        return model, run
    state = T.load_state(path)
    run = state["run"]
    m = dict(run["model"])
    if pretrained is not None:
        fp = T.file_fingerprint(pretrained) if os.path.isfile(pretrained) else None
        if m.get("pretrained_fingerprint") and fp and fp != m["pretrained_fingerprint"]:
            raise T.CheckpointError(
                f"--pretrained {pretrained} is not the backbone file checkpoint {path} was trained with "
                f"({m.get('pretrained')})"
            )
        m["pretrained"] = pretrained
    elif m.get("pretrained") and not os.path.isfile(m["pretrained"]):
        raise FileNotFoundError(
            f"checkpoint {path} was trained on backbone weights {m['pretrained']}, which do not exist here; "
            "pass --pretrained PATH"
        )
    if img_size is not None:
        m["img_size"] = img_size
    if backend is not None:
        m["sa2vp"] = {**m["sa2vp"], "backend": backend}
    seed = int(run["train"].get("seed", 0))
    if not m.get("pretrained"):
        T.seed_everything(seed)  # random-weight backbones are rebuilt from the run's seed
    model = T.build_model(m)
    T.load_trainable(model, state["model"], path)
    return model, run


def cmd_eval(args) -> int:
    from . import train as T
    from .data import DataError, ImageListDataset, build_transform, load_splits

    model, run = load_for_inference(args.checkpoint, args.pretrained, args.img_size, args.backend)
    d = (run or {}).get("data", {})
    root = _pick(args.data, d.get("root"))
    if root is None:
        raise UsageError("--data is required (the checkpoint does not name its data folder)")
    split = args.split or ("test" if d.get("mode") == "trainval_test" else "val")
    mode = "trainval_test" if split == "test" else "train_val"
    splits = load_splits(root, mode, _pick(args.data_format, d.get("format"), "auto"),
                         _pick(args.num_classes, model.num_classes))
    if splits.num_classes != model.num_classes:
        raise DataError(f"{root} has {splits.num_classes} classes, the checkpoint {args.checkpoint} "
                        f"{model.num_classes}")
    samples, name = (splits.train, splits.train_name) if split == "train" else (splits.eval, splits.eval_name)
    family = _pick(args.transform, d.get("family"), "vtab" if splits.format == "vtab" else "fgvc")
    size = model.backbone.patch_embed.img_size[0]
    tf = build_transform(family, False, size, _pick(args.mean, d.get("mean"), (0.5,) * 3),
                         _pick(args.std, d.get("std"), (0.5,) * 3))
    workers = _pick(args.num_workers, _default_workers(int(os.environ.get("WORLD_SIZE", "1"))))
    result = T.run_eval(model, ImageListDataset(samples, tf, name), args.batch_size, workers, args.amp, args.device,
                        progress=not args.no_progress)
    if result.pop("is_main"):
        result.update({"checkpoint": os.path.abspath(args.checkpoint), "data": os.path.abspath(root),
                       "split": split, "file": name})
        print(f"{split} accuracy on {name} ({result['n']} images): {result['acc']:.2f}%  "
              f"(prompt head {result['prompt_acc']:.2f}%, loss {result['loss']:.4f})")
        if args.json:
            T.atomic_write_text(json.dumps(result, indent=2) + "\n", args.json)
    return 0


def cmd_show(args) -> int:
    from .show import write_overlay

    model, run = load_for_inference(args.checkpoint, args.pretrained, args.img_size, args.backend)
    output = args.output or os.path.splitext(args.image)[0] + "_sa2vp.png"
    info = write_overlay(model, args.image, output, layer=args.layer, run=run, alpha=args.alpha, cmap=args.cmap,
                         device=args.device)
    print(f"wrote {output} (P2B block {info['layer']}, message norm {info['min']:.3g} .. {info['max']:.3g}, "
          f"predicted class {info['pred']})")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert-official":
        from . import convert

        return convert.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "presets":
        print(preset_table())
        return 0
    from .data import DataError
    from .train import CheckpointError, NonFiniteLossError

    handlers = {"train": cmd_train, "eval": cmd_eval, "show": cmd_show}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("sa2vp: interrupted; a training run continues from its last finished epoch with "
              "--resume RUN/last.pt", file=sys.stderr)
        return 130
    except (DataError, CheckpointError, NonFiniteLossError, FileExistsError, FileNotFoundError, UsageError,
            ValueError, TypeError) as exc:
        if args.traceback:
            raise
        print(f"sa2vp {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
