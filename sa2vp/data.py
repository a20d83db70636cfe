"""Datasets for SA2VP training: VTAB-1k list folders, FGVC folders in the VPT json layout, ImageFolder.

Layouts (``root`` is the folder given with ``--data``):

* **vtab**: ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt``; each line is
  ``relative/path label`` with an integer label.  Labels are used as they are and must lie in
  ``0 .. num_classes - 1``.
* **fgvc**: ``train.json``, ``val.json``, ``test.json``, each a ``{relative_path: label}`` map.  The
  sorted unique labels of all three files are mapped to ``0 .. K-1`` (the same map for every split).
  Paths are relative to ``root/images`` (CUB, NABirds), ``root/Images`` (Stanford Dogs) or ``root``
  (Cars, Flowers): the first of these that holds the first training image.
* **imagefolder**: ``train/``, ``val/`` and/or ``test/`` sub-folders with one folder per class; class
  ids follow the sorted class-folder names of all splits together.

Splits per mode: ``train_val`` trains on train800 (train) and evaluates on val200 (val);
``trainval_test`` trains on train800val200 (train + val) and evaluates on test.

Every problem with the files (missing, malformed line, label out of range, image missing or unreadable)
raises :class:`DataError` naming the file and, where there is one, the line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "DataError",
    "FORMATS",
    "MODES",
    "ImageListDataset",
    "DataSplits",
    "build_transform",
    "detect_format",
    "load_splits",
    "load_image",
]

FORMATS = ("auto", "vtab", "fgvc", "imagefolder")
MODES = ("train_val", "trainval_test")
VTAB_FILES = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt",
              "test": "test.txt"}
FGVC_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the dataset files: the message names the file and what is wrong."""


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {exc}") from exc


class ImageListDataset(Dataset):
    """``(path, label)`` samples read with PIL and passed through ``transform``.

    With ``seed`` set, the random augmentation of sample ``i`` in epoch ``e`` is drawn from a generator
    seeded with ``(seed, e, i)``: the same crops and flips whatever the number of loader workers or
    processes, and after a resume.  ``set_epoch`` selects the epoch.
    """

    def __init__(self, samples: list[tuple[str, int]], transform=None, source: str = "", seed: int | None = None):
        self.samples = samples
        self.transform = transform
        self.source = source
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = load_image(path)
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed((self.seed * 1_000_003 + self.epoch * 100_003 + index) % 2**63)
                    img = self.transform(img)
        return img, label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


@dataclass
class DataSplits:
    train: list[tuple[str, int]]
    eval: list[tuple[str, int]]
    num_classes: int
    format: str
    train_name: str
    eval_name: str
    class_names: list[str] | None = None


def detect_format(root: str) -> str:
    if not os.path.isdir(root):
        raise DataError(f"--data: {root} is not a directory")
    if any(os.path.exists(os.path.join(root, f)) for f in VTAB_FILES.values()):
        return "vtab"
    if any(os.path.exists(os.path.join(root, f)) for f in FGVC_FILES.values()):
        return "fgvc"
    if any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val", "test")):
        return "imagefolder"
    raise DataError(
        f"--data: cannot tell the layout of {root}: expected VTAB list files ({', '.join(VTAB_FILES.values())}), "
        f"FGVC json files ({', '.join(FGVC_FILES.values())}) or ImageFolder sub-folders train/, val/, test/"
    )


def _require_file(root: str, name: str) -> str:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise DataError(f"missing data file {path}")
    return path


def _check_images_exist(samples, source):
    for path, _ in samples:
        if not os.path.isfile(path):
            raise DataError(f"{source}: image {path} does not exist")


def read_vtab_list(path: str, root: str) -> list[tuple[str, int]]:
    samples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
            rel, label = parts
            try:
                label = int(label)
            except ValueError:
                raise DataError(f"{path}:{lineno}: label {label!r} is not an integer") from None
            if label < 0:
                raise DataError(f"{path}:{lineno}: label {label} is negative")
            samples.append((os.path.join(root, rel), label))
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def read_fgvc_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{relative_path: label}}, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no samples")
    for rel, label in data.items():
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{path}: label of {rel!r} must be an integer or a string, got {label!r}")
    return data


def _sort_labels(labels, source):
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        raise DataError(f"{source}: labels mix integers and strings; use one kind")
    return sorted(labels)


def _check_range(samples, num_classes, source):
    for path, label in samples:
        if not 0 <= label < num_classes:
            raise DataError(
                f"{source}: label {label} of {path} is out of range for {num_classes} classes "
                f"(labels must be 0 .. {num_classes - 1})"
            )


def _load_vtab(root, mode, num_classes):
    if mode == "train_val":
        train_file, eval_file = VTAB_FILES["train"], VTAB_FILES["val"]
    else:
        train_file, eval_file = VTAB_FILES["trainval"], VTAB_FILES["test"]
    train_path, eval_path = _require_file(root, train_file), _require_file(root, eval_file)
    train = read_vtab_list(train_path, root)
    evals = read_vtab_list(eval_path, root)
    if num_classes is None:
        # Class count from every list present, so both modes agree on it.
        labels = [label for _, label in train + evals]
        for name in VTAB_FILES.values():
            path = os.path.join(root, name)
            if name not in (train_file, eval_file) and os.path.isfile(path):
                labels += [label for _, label in read_vtab_list(path, root)]
        num_classes = max(labels) + 1
    _check_range(train, num_classes, train_path)
    _check_range(evals, num_classes, eval_path)
    _check_images_exist(train, train_path)
    _check_images_exist(evals, eval_path)
    return DataSplits(train, evals, num_classes, "vtab", train_file, eval_file)


def _fgvc_image_root(root: str, first: str, source: str) -> str:
    """The folder the json paths are relative to: ``images/`` (CUB, NABirds), ``Images/`` (Stanford Dogs)
    or the dataset folder itself (Cars, Flowers), whichever holds the first listed image."""
    candidates = [os.path.join(root, "images"), os.path.join(root, "Images"), root]
    for base in candidates:
        if os.path.isfile(os.path.join(base, first)):
            return base
    raise DataError(f"{source}: image {first!r} is under none of {', '.join(candidates)}")


def _load_fgvc(root, mode, num_classes):
    paths = {split: _require_file(root, name) for split, name in FGVC_FILES.items()}
    maps = {split: read_fgvc_json(path) for split, path in paths.items()}
    labels = _sort_labels({v for m in maps.values() for v in m.values()}, ", ".join(paths.values()))
    index = {label: i for i, label in enumerate(labels)}
    image_root = _fgvc_image_root(root, next(iter(maps["train"])), paths["train"])

    def samples(split):
        out = [(os.path.join(image_root, rel), index[label]) for rel, label in maps[split].items()]
        _check_images_exist(out, paths[split])
        return out

    if num_classes is None:
        num_classes = len(labels)
    elif num_classes < len(labels):
        raise DataError(
            f"{', '.join(paths.values())}: {len(labels)} distinct labels, more than --num-classes {num_classes}"
        )
    if mode == "train_val":
        train, evals, names = samples("train"), samples("val"), ("train.json", "val.json")
    else:
        train, evals = samples("train") + samples("val"), samples("test")
        names = ("train.json+val.json", "test.json")
    return DataSplits(train, evals, num_classes, "fgvc", *names, class_names=[str(v) for v in labels])


def _scan_class_folders(split_dir):
    return sorted(d.name for d in os.scandir(split_dir) if d.is_dir() and not d.name.startswith("."))


def _load_imagefolder(root, mode, num_classes):
    wanted = ("train", "val") if mode == "train_val" else ("train", "val", "test")
    dirs = {s: os.path.join(root, s) for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s))}
    if mode == "train_val":
        for s in wanted:
            if s not in dirs:
                raise DataError(f"missing ImageFolder split {os.path.join(root, s)} (needed by --mode train_val)")
    else:
        if "train" not in dirs or "test" not in dirs:
            missing = "train" if "train" not in dirs else "test"
            raise DataError(
                f"missing ImageFolder split {os.path.join(root, missing)} (needed by --mode trainval_test)"
            )
    classes = sorted({c for d in dirs.values() for c in _scan_class_folders(d)})
    if not classes:
        raise DataError(f"{root}: no class folders under {', '.join(dirs.values())}")
    index = {c: i for i, c in enumerate(classes)}

    def samples(split):
        out = []
        for c in _scan_class_folders(dirs[split]):
            cdir = os.path.join(dirs[split], c)
            for dirpath, _, files in sorted(os.walk(cdir, followlinks=True)):
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        out.append((os.path.join(dirpath, name), index[c]))
        if not out:
            raise DataError(f"{dirs[split]}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
        return out

    if num_classes is None:
        num_classes = len(classes)
    elif num_classes < len(classes):
        raise DataError(f"{root}: {len(classes)} class folders, more than --num-classes {num_classes}")
    if mode == "train_val":
        train, evals, names = samples("train"), samples("val"), ("train/", "val/")
    else:
        train = samples("train") + (samples("val") if "val" in dirs else [])
        evals = samples("test")
        names = ("train/+val/" if "val" in dirs else "train/", "test/")
    return DataSplits(train, evals, num_classes, "imagefolder", *names, class_names=classes)


def load_splits(root: str, mode: str = "train_val", data_format: str = "auto",
                num_classes: int | None = None) -> DataSplits:
    """Read and validate the sample lists of ``root`` for ``mode`` (no image is decoded here)."""
    if mode not in MODES:
        raise DataError(f"--mode must be one of {MODES}, got {mode!r}")
    if data_format not in FORMATS:
        raise DataError(f"--data-format must be one of {FORMATS}, got {data_format!r}")
    if not os.path.isdir(root):
        raise DataError(f"--data: {root} is not a directory")
    if num_classes is not None and num_classes < 1:
        raise DataError(f"--num-classes must be >= 1, got {num_classes}")
    fmt = detect_format(root) if data_format == "auto" else data_format
    loader = {"vtab": _load_vtab, "fgvc": _load_fgvc, "imagefolder": _load_imagefolder}[fmt]
    return loader(root, mode, num_classes)


def build_transform(family: str, train: bool, img_size: int = 224, mean=(0.5, 0.5, 0.5),
                    std=(0.5, 0.5, 0.5), resize_ratio: float = 256 / 224):
    """Transforms of the authors' recipe.

    ``vtab``: resize to ``img_size x img_size`` (bicubic), no augmentation.  ``fgvc`` / ``imagefolder``:
    resize the shorter side to ``img_size * 256 / 224`` (bilinear), then random crop and horizontal flip
    in training, centre crop at evaluation.
    """
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if family == "vtab":
        return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
                          *normalize])
    if family not in ("fgvc", "imagefolder"):
        raise ValueError(f"family must be 'vtab', 'fgvc' or 'imagefolder', got {family!r}")
    resize = int(round(img_size * resize_ratio))
    if train:
        return T.Compose([T.Resize(resize), T.RandomCrop(img_size), T.RandomHorizontalFlip(), *normalize])
    return T.Compose([T.Resize(resize), T.CenterCrop(img_size), *normalize])


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, labels
