"""Training and evaluation loop for SA2VP, on one process or many (torchrun + DistributedDataParallel).

The run is described by a plain dict (``run``) with three sections, stored in every checkpoint:

* ``model``: backbone name and keyword arguments, image size, classes, SA2VP variant and overrides,
  pretrained file (and a fingerprint of it);
* ``data``: data folder, layout, mode, transform family, normalisation;
* ``train``: epochs, warmup, learning rates, weight decay, batch size per optimizer step, gradient
  accumulation, precision, seed, evaluation and checkpoint intervals.

Recipe: AdamW (no weight decay on biases and 1-D parameters), per-step linear warmup then cosine decay
to ``min_lr``, bf16 autocast on GPU by default (fp16 with a GradScaler on request; fp32 on CPU unless bf16
is asked for).
``batch_size`` is the number of images per optimizer step over all processes:
``batch_size = world_size * accum_steps * per-process micro-batch``.

Checkpoints (``last.pt`` every epoch, ``best.pt``, ``epoch_NNNN.pt`` every ``save_every`` epochs) hold
the trainable parameters, optimizer, schedule, scaler, epoch, step, the RNG states of every process and
the run dict; they are written to a temporary file and moved into place with :func:`os.replace`, so a
crash never leaves a half-written checkpoint.  A resumed run restarts at the first unfinished epoch and,
with a fixed seed, reproduces the uninterrupted run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

__all__ = [
    "CheckpointError",
    "DistInfo",
    "Trainer",
    "WarmupCosine",
    "atomic_save",
    "build_model",
    "evaluate",
    "init_distributed",
    "load_state",
    "param_groups",
    "run_eval",
    "run_train",
]

STATE_FORMAT = "sa2vp-train-state"
STATE_VERSION = 1
# Keys of the run dict that must agree between a checkpoint and the run resuming from it.
LOCKED_KEYS = {
    "model": ("backbone", "backbone_kwargs", "img_size", "num_classes", "variant", "sa2vp", "backbone_dropout",
              "pretrained_fingerprint"),
    "data": ("format", "mode", "family", "mean", "std", "train_size"),
    "train": ("epochs", "warmup_epochs", "lr", "min_lr", "weight_decay", "batch_size", "accum_steps", "seed",
              "clip_grad"),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or written for another run."""


# ----------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group set up by torchrun (``WORLD_SIZE > 1``) or describe a single process.

    ``device``: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.  CUDA runs use NCCL with one device
    per process (``LOCAL_RANK``); CPU runs use gloo.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=torch.device("cuda") if use_cuda else torch.device("cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def _all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if info.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Seeds and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        # Only this process' device: touching the others would create a CUDA context on each of them.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Model


def file_fingerprint(path: str | None) -> str | None:
    """Size plus SHA-256 of the first and last MiB: cheap, and enough to tell weight files apart."""
    if not path:
        return None
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()[:32]}"


VIT_ONLY_KEYS = ("cross_heads", "b2p_layers", "deep_layers")
SWIN_ONLY_KEYS = ("stages", "b2p_blocks")


def is_swin(model_cfg: dict) -> bool:
    from .swin import is_swin_backbone

    return is_swin_backbone(model_cfg["backbone"])


def build_backbone(model_cfg: dict):
    """The frozen backbone of a run (random weights; SA2VP loads the pretrained file)."""
    kwargs = dict(model_cfg.get("backbone_kwargs") or {})
    p = model_cfg.get("backbone_dropout") or 0.0
    swin = is_swin(model_cfg)
    if p:
        kwargs.setdefault("proj_drop_rate", p)
        if not swin:
            kwargs.setdefault("pos_drop_rate", p)
    if model_cfg.get("img_size"):
        kwargs.setdefault("img_size", model_cfg["img_size"])
    kwargs.setdefault("num_classes", 0)
    try:
        if swin:
            from .swin import build_swin_backbone

            return build_swin_backbone(model_cfg["backbone"], kwargs)
        from .weights import build_backbone as build_vit

        return build_vit(model_cfg["backbone"], kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"--backbone {model_cfg['backbone']!r} with {kwargs}: {exc}") from exc


def sa2vp_config(model_cfg: dict, backbone=None):
    """The SA2VP config of a run: variant defaults, then explicit overrides.

    ViT backbones get an :class:`sa2vp.SA2VPConfig`, Swin backbones an :class:`sa2vp.SA2VPSwinConfig`.
    """
    overrides = dict(model_cfg.get("overrides") or {})
    variant = model_cfg.get("variant") or "paper"
    if is_swin(model_cfg):
        from .swin import SA2VPSwinConfig

        wrong = [k for k in VIT_ONLY_KEYS if overrides.get(k) is not None]
        if wrong or model_cfg.get("deep_prompts") is not None:
            wrong += ["deep_prompts"] if model_cfg.get("deep_prompts") is not None else []
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in wrong)}: ViT-only settings, but "
                             f"{model_cfg['backbone']} is a Swin Transformer")
        if variant != "paper":
            raise ValueError(f"--variant {variant}: the authors' variants are ViT code; Swin runs use 'paper'")
        return SA2VPSwinConfig(**{k: v for k, v in overrides.items() if v is not None})
    from sa2vp import SA2VPConfig

    wrong = [k for k in SWIN_ONLY_KEYS if overrides.get(k) is not None]
    if wrong:
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in wrong)}: Swin-only settings, but "
                         f"{model_cfg['backbone']} is a ViT")
    deep_prompts = model_cfg.get("deep_prompts")
    if deep_prompts is not None and overrides.get("deep_layers") is None and backbone is not None:
        depth = len(backbone.blocks)
        b2p = overrides.get("b2p_layers")
        b2p = sorted(b2p) if b2p is not None else [i for i in range(depth) if i % 4 == 0]
        overrides["deep_layers"] = tuple([i for i in b2p if i != 0][:deep_prompts])
    return SA2VPConfig.from_variant(variant, **overrides)


def build_model(model_cfg: dict, pretrained: str | None = None):
    """Build the SA2VP model of a run dict's ``model`` section (frozen backbone, fresh prompts)."""
    from sa2vp import SA2VP, SA2VPConfig

    backbone = build_backbone(model_cfg)
    swin = is_swin(model_cfg)
    if model_cfg.get("sa2vp") is not None:
        if swin:
            from .swin import SA2VPSwinConfig

            config = SA2VPSwinConfig.from_dict(model_cfg["sa2vp"])
        else:
            config = SA2VPConfig.from_dict(model_cfg["sa2vp"])
    else:
        config = sa2vp_config(model_cfg, backbone)
    pretrained = pretrained if pretrained is not None else model_cfg.get("pretrained")
    if pretrained and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"--pretrained: {pretrained} does not exist")
    if swin:
        from .swin import SA2VPSwin

        return SA2VPSwin(backbone, model_cfg["num_classes"], config, pretrained_path=pretrained or None)
    return SA2VP(backbone, model_cfg["num_classes"], config, pretrained_path=pretrained or None)


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and 1-D parameters (norms, scales)."""
    decay, no_decay = [], []
    for name, p in model.trainable_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """Per-step learning rate: linear warmup to ``lr`` over ``warmup_steps``, then cosine to ``min_lr``."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self) -> float:
        """Set the learning rate of the coming optimizer step."""
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step_num += 1

    def state_dict(self) -> dict:
        return {"step_num": self.step_num, "lr": self.lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_num = int(state["step_num"])


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def _atomic_write(path: str, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, then ``os.replace`` it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` that never leaves a half-written file at ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def export_model(model, path: str, include_backbone: bool = False) -> bool:
    """Write the model with :func:`sa2vp.save_checkpoint` (safetensors), atomically.

    ``include_backbone``: also store the frozen backbone (for runs without a pretrained weights file).
    Returns False, writing nothing, for model classes the safetensors format does not cover.
    """
    from sa2vp import save_checkpoint

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp.safetensors")
    try:
        save_checkpoint(model, tmp, include_backbone=include_backbone)
        os.replace(tmp, path)
    except TypeError:  # save_checkpoint rejects the model class
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return False
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def load_state(path: str) -> dict:
    """Read a training checkpoint written by :class:`Trainer`; a clear error for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read as a SA2VP training checkpoint: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a SA2VP training checkpoint (no '{STATE_FORMAT}' tag)")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, expected {STATE_VERSION}")
    for key in ("run", "model", "optimizer", "scheduler", "epoch", "step", "rng"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the entry {key!r}")
    return state


def _normalise(value):
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in sorted(value.items())}
    return value


def run_differences(saved: dict, current: dict) -> list[str]:
    """Locked run keys whose values differ between a checkpoint and the current run."""
    diffs = []
    for section, keys in LOCKED_KEYS.items():
        for key in keys:
            a = _normalise(saved.get(section, {}).get(key))
            b = _normalise(current.get(section, {}).get(key))
            if a != b:
                diffs.append(f"{section}.{key}: checkpoint {a!r}, this run {b!r}")
    return diffs


def load_trainable(model, state_dict: dict, source: str) -> None:
    try:
        model.load_trainable_state_dict(state_dict)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {source} does not fit this model: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# Evaluation


AMP_CHOICES = ("auto", "bf16", "fp16", "fp32")


def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision a run uses on ``device``: ``auto`` is bf16 on a GPU and fp32 on the CPU; bf16 autocast
    also runs on the CPU (worth it where the CPU has bfloat16 matrix units, e.g. AMX); fp16 needs a GPU."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if device.type != "cuda" and amp != "fp32" and not (device.type == "cpu" and amp == "bf16"):
        raise ValueError(f"--amp {amp} needs a CUDA GPU (this run is on {device}); use bf16 or fp32 on the CPU")
    return amp


def _autocast(device: torch.device, amp: str):
    amp = resolve_amp(amp, device)
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def shard(dataset, info: DistInfo):
    """This process' share of ``dataset`` for evaluation: every sample exactly once over all processes."""
    if not info.distributed:
        return dataset
    return Subset(dataset, list(range(info.rank, len(dataset), info.world_size)))


@torch.no_grad()
def evaluate(model, loader, info: DistInfo, amp: str = "fp32", progress: bool = False) -> dict:
    """Top-1 accuracy (%) and mean cross-entropy of both heads, summed over every process."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    correct = prompt_correct = loss_sum = total = 0.0
    if progress and info.is_main:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="eval", leave=False, dynamic_ncols=True, file=sys.stderr, disable=None)
    for images, labels in loader:
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        with _autocast(info.device, amp):
            out = model(images)
        logits = out.logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        prompt_correct += (out.prompt_logits.float().argmax(-1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    correct, prompt_correct, loss_sum, total = _all_reduce_sum([correct, prompt_correct, loss_sum, total], info)
    total = max(total, 1.0)
    return {"acc": 100.0 * correct / total, "prompt_acc": 100.0 * prompt_correct / total,
            "loss": loss_sum / total, "n": int(total)}


# ----------------------------------------------------------------------------------------------------------
# Training


class _Logger:
    """JSONL metrics (and TensorBoard when installed), written by the main process only."""

    def __init__(self, output: str | None, enabled: bool, tensorboard: bool = True):
        self.file = None
        self.tb = None
        if not enabled or output is None:
            return
        os.makedirs(output, exist_ok=True)
        self.file = open(os.path.join(output, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(output, "tensorboard"))

    def log(self, record: dict, step: int | None = None) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.file.flush()
        if self.tb is not None and step is not None:
            prefix = record.get("event", "metric")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (the epoch is abandoned, nothing is saved)."""


class Trainer:
    """Runs the recipe on ``train_set`` / ``eval_set`` for the run dict ``run``.

    ``model`` is an :class:`sa2vp.SA2VP` already on ``info.device``.  Only the main process writes
    checkpoints and logs (under ``output``; ``None`` writes nothing).
    """

    def __init__(self, model, train_set, eval_set, run: dict, info: DistInfo, output: str | None,
                 progress: bool = True, eval_name: str = "eval", select_best: bool = True, echo=print,
                 print_every: int = 1):
        t = run["train"]
        self.run, self.info, self.output = run, info, output
        self.train_set, self.eval_set = train_set, eval_set
        self.epochs, self.amp = int(t["epochs"]), t["amp"]
        self.eval_every, self.save_every = int(t["eval_every"]), int(t["save_every"])
        self.log_every = max(int(t.get("log_every") or 10), 1)
        self.accum = int(t["accum_steps"])
        self.clip_grad = t.get("clip_grad")
        self.seed = int(t["seed"])
        self.eval_name, self.select_best = eval_name, select_best
        self.print_every = max(int(print_every), 1)
        self.progress = progress and info.is_main
        self.echo = echo if info.is_main else (lambda *a, **k: None)

        per_step = info.world_size * self.accum
        if t["batch_size"] % per_step:
            raise ValueError(
                f"--batch-size {t['batch_size']} must be divisible by world size {info.world_size} x "
                f"--accum-steps {self.accum} = {per_step}"
            )
        self.micro_batch = t["batch_size"] // per_step
        workers = int(t.get("num_workers") or 0)
        self.sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                          shuffle=True, seed=self.seed, drop_last=False)
        pin = info.device.type == "cuda"
        self.loader_kwargs = dict(batch_size=self.micro_batch, num_workers=workers, pin_memory=pin,
                                  drop_last=False)
        self.eval_loader = None
        if eval_set is not None:
            eval_bs = int(t.get("eval_batch_size") or max(self.micro_batch, 1) * 2)
            self.eval_loader = DataLoader(shard(eval_set, info), batch_size=eval_bs, shuffle=False,
                                          num_workers=workers, pin_memory=pin)
        self.batches_per_epoch = math.ceil(len(self.sampler) / self.micro_batch)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.accum)

        self.model = model
        self.module = model
        self.optimizer = torch.optim.AdamW(param_groups(model, t["weight_decay"]), lr=t["lr"],
                                           betas=(0.9, 0.999))
        self.schedule = WarmupCosine(self.optimizer, t["lr"], t["min_lr"],
                                     warmup_steps=int(round(t["warmup_epochs"] * self.steps_per_epoch)),
                                     total_steps=self.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=(self.amp == "fp16"
                                                                     and info.device.type == "cuda"))
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids)
        self.start_epoch = 0
        self.step = 0
        self.best = {"acc": None, "epoch": None}
        self.last_eval = None
        self.logger = _Logger(output, info.is_main, tensorboard=bool(t.get("tensorboard", True)))
        # Without a weights file the (random) backbone goes into the exported model, to make it usable.
        self.export_backbone = not run["model"].get("pretrained")
        self._warned = False

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self, epoch: int) -> dict:
        states = [rng_state()]
        if self.info.distributed:
            states = [None] * self.info.world_size
            dist.all_gather_object(states, rng_state())
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "run": self.run,
            "model": self.module.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "step": self.step,
            "rng": states,
            "best": dict(self.best),
            "last_eval": self.last_eval,
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        diffs = run_differences(state["run"], self.run)
        if diffs:
            raise CheckpointError(f"checkpoint {source} was written for another run:\n  " + "\n  ".join(diffs))
        load_trainable(self.module, state["model"], source)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {source}: optimizer state does not fit this model: {exc}") from None
        self.schedule.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"])
        self.step = int(state["step"])
        if self.step != self.start_epoch * self.steps_per_epoch or self.schedule.step_num != self.step:
            raise CheckpointError(
                f"checkpoint {source}: step {self.step} does not match epoch {self.start_epoch} x "
                f"{self.steps_per_epoch} steps per epoch"
            )
        self.best = dict(state.get("best") or self.best)
        self.last_eval = state.get("last_eval")
        self.logger.log({"event": "resume", "epoch": self.start_epoch, "step": self.step, "source": source})
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            set_rng_state(rng[self.info.rank])
        else:
            self.echo(f"note: checkpoint was written by {len(rng)} processes, this run has "
                      f"{self.info.world_size}; random streams are reseeded")
            seed_everything(self.seed + 1000 * self.start_epoch + self.info.rank)

    def save(self, epoch: int, improved: bool) -> None:
        state = self.state_dict(epoch)  # collective: every process takes part
        if not self.info.is_main or self.output is None:
            return
        atomic_save(state, os.path.join(self.output, "last.pt"))
        if self.save_every and epoch % self.save_every == 0:
            atomic_save(state, os.path.join(self.output, f"epoch_{epoch:04d}.pt"))
        if improved:
            atomic_save(state, os.path.join(self.output, "best.pt"))
            self._export("best.safetensors")

    def _export(self, name: str) -> None:
        if not export_model(self.module, os.path.join(self.output, name), self.export_backbone) and not self._warned:
            self._warned = True
            self.echo(f"note: sa2vp.save_checkpoint does not take a {type(self.module).__name__}; no .safetensors "
                      "export, use the training checkpoints (last.pt, best.pt) with eval and show")

    # ---- loop ---------------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(self.seed * 100003 + epoch * 1009 + self.info.rank)
        return DataLoader(self.train_set, sampler=self.sampler, generator=g, **self.loader_kwargs)

    def after_step(self, epoch: int, loss: float | None, lr: float, images_per_s: float) -> None:
        """Called after every optimizer step; logs every ``log_every`` steps."""
        if loss is not None and self.step % self.log_every == 0:
            self.logger.log({"event": "train_step", "epoch": epoch + 1, "step": self.step, "loss": loss,
                             "lr": lr, "images_per_s": images_per_s}, step=self.step)

    def train_epoch(self, epoch: int) -> dict:
        self.model.train()
        loader = self._loader(epoch)
        n_batches = len(loader)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False,
                       dynamic_ncols=True, file=sys.stderr, disable=None)
        device = self.info.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        window_loss = torch.zeros((), dtype=torch.float64, device=device)
        window_seen = 0
        t0 = time.perf_counter()
        lr = step_lr = self.schedule.apply()
        self.optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            window_start = (i // self.accum) * self.accum
            window = min(self.accum, n_batches - window_start)
            last_in_window = i + 1 == window_start + window
            sync = contextlib.nullcontext()
            if self.info.distributed and not last_in_window:
                sync = self.model.no_sync()
            with sync:
                with _autocast(device, self.amp):
                    out = self.model(images)
                    loss = self.module.loss(out, labels)
                self.scaler.scale(loss / window).backward()
            batch_loss = loss.detach().double() * labels.numel()
            loss_sum += batch_loss
            window_loss += batch_loss
            seen += labels.numel()
            window_seen += labels.numel()
            if not last_in_window:
                continue
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                               self.clip_grad)
            step_lr = lr
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.advance()
            self.step += 1
            elapsed = max(time.perf_counter() - t0, 1e-9)
            ips = seen * self.info.world_size / elapsed
            loss_value = None
            if self.step % self.log_every == 0 or (bar is not None and not bar.disable):
                loss_value = (window_loss / max(window_seen, 1)).item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"training loss became {loss_value} at epoch {epoch + 1}, step {self.step}; "
                        "nothing was saved for this epoch (lower --lr, or try --amp bf16/fp32)"
                    )
            window_loss.zero_()
            window_seen = 0
            self.after_step(epoch, loss_value, lr, ips)
            if bar is not None and not bar.disable:
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}", refresh=False)
                bar.update(1)
            lr = self.schedule.apply()
        if bar is not None:
            bar.close()
        total_loss, total_seen = _all_reduce_sum([loss_sum.item(), float(seen)], self.info)
        mean_loss = total_loss / max(total_seen, 1.0)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(
                f"training loss became {mean_loss} in epoch {epoch + 1}; nothing was saved for this epoch "
                "(lower --lr, or try --amp bf16/fp32)"
            )
        elapsed = time.perf_counter() - t0
        return {"loss": mean_loss, "lr": step_lr, "images_per_s": total_seen / max(elapsed, 1e-9),
                "seconds": elapsed}

    def fit(self) -> dict:
        """Train from ``start_epoch`` to the end; returns the summary (final and best evaluation)."""
        try:
            return self._fit()
        except BaseException as exc:
            self.logger.log({"event": "stopped", "step": self.step, "reason": f"{type(exc).__name__}: {exc}"[:500]})
            raise
        finally:
            self.logger.close()

    def _fit(self) -> dict:
        info = self.info
        t_start = time.perf_counter()
        if self.start_epoch >= self.epochs:
            self.echo(f"nothing to do: the checkpoint already finished all {self.epochs} epochs")
        for epoch in range(self.start_epoch, self.epochs):
            stats = self.train_epoch(epoch)
            done = epoch + 1
            record = {"event": "epoch", "epoch": done, "step": self.step, **stats}
            improved = False
            if self.eval_loader is not None and (done % self.eval_every == 0 or done == self.epochs):
                self.last_eval = {"epoch": done, **evaluate(self.model, self.eval_loader, info, self.amp,
                                                            self.progress)}
                record.update({f"{self.eval_name}_{k}": v for k, v in self.last_eval.items() if k != "epoch"})
                if self.select_best and (self.best["acc"] is None or self.last_eval["acc"] > self.best["acc"]):
                    self.best = {"acc": self.last_eval["acc"], "epoch": done}
                    improved = True
            self.logger.log(record, step=self.step)
            msg = (f"epoch {done}/{self.epochs}  loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
                   f"{stats['images_per_s']:.1f} img/s")
            evaluated = (self.last_eval or {}).get("epoch") == done
            if evaluated:
                msg += f"  {self.eval_name} acc {self.last_eval['acc']:.2f}%"
            if evaluated or done % self.print_every == 0 or done == self.epochs:
                self.echo(msg)
            self.save(done, improved)
        _barrier(info)
        summary = {"epochs": self.epochs, "steps": self.step, "seconds": time.perf_counter() - t_start,
                   "final": self.last_eval, "best": self.best if self.select_best else None}
        if info.is_main and self.output is not None:
            self._export("final.safetensors")
            atomic_write_text(json.dumps(summary, indent=2) + "\n", os.path.join(self.output, "summary.json"))
        self.logger.log({"event": "done", **{k: v for k, v in summary.items() if k in ("steps", "seconds")}})
        return summary


# ----------------------------------------------------------------------------------------------------------
# Entry points used by the command line


def _datasets(run: dict, splits):
    from .data import ImageListDataset, build_transform

    d, m = run["data"], run["model"]
    family = d["family"]
    size = m["img_size"] or 224
    train_tf = build_transform(family, True, size, d["mean"], d["std"])
    eval_tf = build_transform(family, False, size, d["mean"], d["std"])
    train = ImageListDataset(splits.train, train_tf, splits.train_name, seed=int(run["train"]["seed"]))
    evals = ImageListDataset(splits.eval, eval_tf, splits.eval_name)
    return train, evals


RUN_FILES = ("last.pt", "best.pt", "best.safetensors", "final.safetensors", "metrics.jsonl", "summary.json",
             "run.json")


def prepare_output(output: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over an existing one (it would replace its checkpoints).

    With ``overwrite`` the files of the old run are deleted (by the main process) instead.
    """
    if resume is not None or not os.path.isdir(output):
        return
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(output, f))]
    existing += sorted(f for f in os.listdir(output) if f.startswith("epoch_") and f.endswith(".pt"))
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"--output {output} already holds a run ({', '.join(existing)}); pass --resume "
            f"{os.path.join(output, 'last.pt')} to continue it, --overwrite to replace it, or another --output"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        for name in existing:
            os.remove(os.path.join(output, name))


def run_train(run: dict, output: str | None, resume_state: dict | None = None, resume_path: str | None = None,
              progress: bool = True, device: str = "auto", echo=print) -> dict:
    """Train the run described by ``run`` (see :mod:`sa2vp.cli` for how flags become this dict)."""
    from .data import load_splits

    info = init_distributed(device)
    try:
        d = run["data"]
        splits = load_splits(d["root"], d["mode"], d["format"], run["model"].get("num_classes"))
        run["model"]["num_classes"] = splits.num_classes
        run["data"]["format"] = splits.format
        run["data"]["train_size"] = len(splits.train)
        run["data"]["class_names"] = splits.class_names
        if run["data"]["family"] is None:
            run["data"]["family"] = "vtab" if splits.format == "vtab" else "fgvc"
        train_set, eval_set = _datasets(run, splits)
        run["train"]["amp"] = resolve_amp(run["train"]["amp"], info.device)
        seed_everything(int(run["train"]["seed"]))
        model = build_model(run["model"]).to(info.device)
        run["model"]["sa2vp"] = model.config.to_dict()
        seed_everything(int(run["train"]["seed"]) + info.rank)
        eval_name = "test" if d["mode"] == "trainval_test" else "val"
        trainer = Trainer(model, train_set, eval_set, run, info, output, progress=progress, eval_name=eval_name,
                          select_best=(d["mode"] == "train_val"), echo=echo)
        if resume_state is not None:
            trainer.load_state_dict(resume_state, resume_path)
            echo(f"resumed from {resume_path} at epoch {trainer.start_epoch}, step {trainer.step}")
        if info.is_main and output is not None:
            os.makedirs(output, exist_ok=True)
            atomic_write_text(json.dumps(run, indent=2, default=str) + "\n", os.path.join(output, "run.json"))
        n_train = sum(p.numel() for _, p in model.trainable_parameters())
        n_total = sum(p.numel() for p in model.parameters())
        echo(f"data: {splits.format} {d['root']} ({len(splits.train)} train [{splits.train_name}], "
             f"{len(splits.eval)} {eval_name} [{splits.eval_name}], {splits.num_classes} classes)")
        echo(f"model: {run['model']['backbone']}, {n_train:,} trainable of {n_total:,} parameters "
             f"({100.0 * n_train / max(n_total, 1):.2f}%); device {info.device} x {info.world_size}, "
             f"precision {run['train']['amp']}, micro-batch {trainer.micro_batch}")
        summary = trainer.fit()
        if summary["final"] is not None:
            echo(f"final {eval_name} accuracy ({splits.eval_name}, epoch {summary['final']['epoch']}): "
                 f"{summary['final']['acc']:.2f}%")
        if summary["best"] and summary["best"]["acc"] is not None:
            echo(f"best {eval_name} accuracy: {summary['best']['acc']:.2f}% at epoch {summary['best']['epoch']}")
        return summary
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run_eval(model, eval_set, batch_size: int, num_workers: int, amp: str, device: str = "auto",
             progress: bool = True) -> dict:
    """Evaluate ``model`` on ``eval_set`` (sharded over the processes of a torchrun job)."""
    info = init_distributed(device)
    try:
        amp = resolve_amp(amp, info.device)
        model = model.to(info.device)
        loader = DataLoader(shard(eval_set, info), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=info.device.type == "cuda")
        result = evaluate(model, loader, info, amp, progress)
        result["is_main"] = info.is_main
        return result
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
