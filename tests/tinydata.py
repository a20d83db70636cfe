"""Tiny image datasets on disk in the three layouts ``sa2vp train`` reads, plus a tiny-ViT flag set."""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

# A 5-block ViT on 32 x 32 inputs with 8 x 8 patches: a 4 x 4 token grid, B2P blocks {0, 4}, deep {4}.
TINY_VIT = [
    "--backbone", "vit_tiny_patch16_224",
    "--backbone-kwargs", "depth=5", "embed_dim=32", "num_heads=2", "patch_size=8", "mlp_ratio=2",
    "--img-size", "32", "--inter-dim", "4", "--backend", "reference", "--num-workers", "0", "--no-progress",
]


def make_image(path: str, label: int, index: int, size=(28, 22)) -> None:
    """An RGB image whose class shows as a bright horizontal band at a class-dependent height."""
    rng = np.random.default_rng(1000 * label + index)
    w, h = size
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    band = (label * h) // 4
    img[band:band + max(h // 5, 2), :, label % 3] = 230
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path)


def _split(counts: dict[int, int], prefix: str, offset: int):
    items = []
    for label, n in counts.items():
        for i in range(n):
            items.append((f"{prefix}/c{label}_{offset + i}.png", label))
    return items


def make_vtab(root: str, n_train: int = 2, n_val: int = 1, n_test: int = 2, classes: int = 3) -> str:
    """``root`` with train800/val200/train800val200/test lists (``n_*`` images per class)."""
    train = _split({c: n_train for c in range(classes)}, "images/train", 0)
    val = _split({c: n_val for c in range(classes)}, "images/train", 100)
    test = _split({c: n_test for c in range(classes)}, "images/test", 0)
    for i, (rel, label) in enumerate(train + val + test):
        make_image(os.path.join(root, rel), label, i)
    for name, items in (("train800.txt", train), ("val200.txt", val), ("train800val200.txt", train + val),
                        ("test.txt", test)):
        with open(os.path.join(root, name), "w") as f:
            f.writelines(f"{rel} {label}\n" for rel, label in items)
    return root


def make_fgvc(root: str, labels=(3, 7, 12), n_train: int = 3, n_val: int = 1, n_test: int = 2) -> str:
    """VPT json layout with non-contiguous labels (as CUB's 1-based or NABirds' sparse ids)."""
    maps = {"train.json": {}, "val.json": {}, "test.json": {}}
    k = 0
    for cls_index, label in enumerate(labels):
        for name, n in (("train.json", n_train), ("val.json", n_val), ("test.json", n_test)):
            for i in range(n):
                rel = f"{label:03d}.bird/{name[:-5]}_{i}.jpg"
                make_image(os.path.join(root, "images", rel), cls_index, k)
                maps[name][rel] = label
                k += 1
    for name, data in maps.items():
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f)
    return root


def make_imagefolder(root: str, classes=("ant", "bee", "cat"), n_train: int = 2, n_val: int = 1,
                     n_test: int = 1) -> str:
    k = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for c, name in enumerate(classes):
            for i in range(n):
                make_image(os.path.join(root, split, name, f"{i}.png"), c, k)
                k += 1
    return root
