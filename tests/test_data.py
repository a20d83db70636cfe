"""Dataset layouts, label maps, transforms and the errors for bad data files."""
import json
import os

import pytest
import torch
from PIL import Image

from sa2vp.data import DataError, ImageListDataset, build_transform, detect_format, load_splits
from tinydata import make_fgvc, make_imagefolder, make_vtab


def test_vtab_lists_and_modes(tmp_path):
    root = make_vtab(str(tmp_path / "vtab"), n_train=2, n_val=1, n_test=2, classes=3)
    assert detect_format(root) == "vtab"
    tv = load_splits(root, "train_val")
    assert (len(tv.train), len(tv.eval), tv.num_classes) == (6, 3, 3)
    assert (tv.train_name, tv.eval_name) == ("train800.txt", "val200.txt")
    tt = load_splits(root, "trainval_test")
    assert (len(tt.train), len(tt.eval)) == (9, 6)
    assert (tt.train_name, tt.eval_name) == ("train800val200.txt", "test.txt")
    with open(os.path.join(root, "test.txt")) as f:
        first = f.readline().split()
    assert tt.eval[0] == (os.path.join(root, first[0]), int(first[1]))


def test_vtab_class_count_uses_every_list(tmp_path):
    root = make_vtab(str(tmp_path / "vtab"), classes=3)
    # A class only present in the test list still counts in train_val mode (both modes agree).
    with open(os.path.join(root, "test.txt"), "a") as f:
        f.write("images/test/c0_0.png 4\n")
    assert load_splits(root, "train_val").num_classes == 5
    assert load_splits(root, "trainval_test").num_classes == 5


def test_fgvc_labels_mapped_to_contiguous_ids(tmp_path):
    root = make_fgvc(str(tmp_path / "fgvc"), labels=(3, 7, 12))
    assert detect_format(root) == "fgvc"
    tv = load_splits(root, "train_val")
    assert tv.num_classes == 3 and tv.class_names == ["3", "7", "12"]
    with open(os.path.join(root, "train.json")) as f:
        raw = json.load(f)
    expected = {os.path.join(root, "images", rel): {3: 0, 7: 1, 12: 2}[label] for rel, label in raw.items()}
    assert dict(tv.train) == expected
    tt = load_splits(root, "trainval_test")
    assert len(tt.train) == 3 * (3 + 1) and len(tt.eval) == 3 * 2


def test_fgvc_string_labels_sorted(tmp_path):
    root = make_fgvc(str(tmp_path / "fgvc"), labels=(0, 1))
    for name in ("train.json", "val.json", "test.json"):
        path = os.path.join(root, name)
        with open(path) as f:
            data = json.load(f)
        with open(path, "w") as f:
            json.dump({k: ["zebra", "aardvark"][v] for k, v in data.items()}, f)
    splits = load_splits(root, "train_val")
    assert splits.class_names == ["aardvark", "zebra"]
    assert {label for _, label in splits.train} == {0, 1}


def test_imagefolder(tmp_path):
    root = make_imagefolder(str(tmp_path / "if"), classes=("bee", "ant", "cat"))
    assert detect_format(root) == "imagefolder"
    tv = load_splits(root, "train_val")
    assert tv.class_names == ["ant", "bee", "cat"] and tv.num_classes == 3
    assert all(os.sep + ["ant", "bee", "cat"][label] + os.sep in path for path, label in tv.train)
    tt = load_splits(root, "trainval_test")
    assert len(tt.train) == 9 and len(tt.eval) == 3


def test_transforms_vtab_and_fgvc(tmp_path):
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    x = build_transform("vtab", True, 24)(img)
    assert x.shape == (3, 24, 24)
    # mean = std = 0.5 maps 255 -> 1, 0 -> -1.
    assert torch.allclose(x[0], torch.ones(24, 24)) and torch.allclose(x[1], -torch.ones(24, 24))
    for train in (True, False):
        y = build_transform("fgvc", train, 24)(img)
        assert y.shape == (3, 24, 24)
    z = build_transform("vtab", False, 24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img)
    assert torch.allclose(z[0], torch.ones(24, 24))


def _expect(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match):
        fn(*args, **kwargs)


def test_bad_vtab_files(tmp_path):
    root = make_vtab(str(tmp_path / "vtab"))
    os.remove(os.path.join(root, "val200.txt"))
    _expect(r"missing data file .*val200\.txt", load_splits, root, "train_val")

    root = make_vtab(str(tmp_path / "v2"))
    with open(os.path.join(root, "train800.txt"), "a") as f:
        f.write("images/train/c0_0.png\n")
    _expect(r"train800\.txt:7: expected 'relative/path label'", load_splits, root, "train_val")

    root = make_vtab(str(tmp_path / "v3"))
    with open(os.path.join(root, "train800.txt"), "a") as f:
        f.write("images/train/c0_0.png cat\n")
    _expect(r"train800\.txt:7: label 'cat' is not an integer", load_splits, root, "train_val")

    root = make_vtab(str(tmp_path / "v4"))
    _expect(r"train800\.txt: label 2 .* out of range for 2 classes", load_splits, root, "train_val", num_classes=2)

    root = make_vtab(str(tmp_path / "v5"))
    with open(os.path.join(root, "val200.txt"), "a") as f:
        f.write("images/nowhere.png 0\n")
    _expect(r"val200\.txt: image .*nowhere\.png does not exist", load_splits, root, "train_val")


def test_bad_fgvc_files(tmp_path):
    root = make_fgvc(str(tmp_path / "f1"))
    with open(os.path.join(root, "val.json"), "w") as f:
        f.write('{"a.jpg": 1,')
    _expect(r"val\.json: not valid JSON", load_splits, root, "train_val")

    root = make_fgvc(str(tmp_path / "f2"))
    with open(os.path.join(root, "test.json"), "w") as f:
        json.dump(["a.jpg", 1], f)
    _expect(r"test\.json: expected a JSON object", load_splits, root, "train_val")

    root = make_fgvc(str(tmp_path / "f3"))
    os.remove(os.path.join(root, "train.json"))
    _expect(r"missing data file .*train\.json", load_splits, root, "train_val")

    root = make_fgvc(str(tmp_path / "f4"))
    _expect(r"3 distinct labels, more than --num-classes 2", load_splits, root, "train_val", num_classes=2)

    root = make_fgvc(str(tmp_path / "f5"))
    with open(os.path.join(root, "train.json")) as f:
        data = json.load(f)
    data["x.jpg"] = [1]
    with open(os.path.join(root, "train.json"), "w") as f:
        json.dump(data, f)
    _expect(r"train\.json: label of 'x\.jpg' must be an integer or a string", load_splits, root, "train_val")


def test_bad_layout_and_arguments(tmp_path):
    _expect(r"is not a directory", load_splits, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    _expect(r"cannot tell the layout", load_splits, str(tmp_path / "empty"))
    root = make_vtab(str(tmp_path / "vtab"))
    _expect(r"--mode must be one of", load_splits, root, "test_only")
    root = make_imagefolder(str(tmp_path / "if"))
    import shutil

    shutil.rmtree(os.path.join(root, "val"))
    _expect(r"missing ImageFolder split .*val", load_splits, root, "train_val")


def test_unreadable_image_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png at all")
    ds = ImageListDataset([(str(path), 0)], build_transform("vtab", False, 16))
    with pytest.raises(DataError, match=r"cannot read image .*broken\.png"):
        ds[0]


def test_fgvc_image_folder_variants(tmp_path):
    # Stanford Dogs keeps its images in Images/, Cars and Flowers next to the json files.
    root = make_fgvc(str(tmp_path / "dogs"))
    os.rename(os.path.join(root, "images"), os.path.join(root, "Images"))
    splits = load_splits(root, "train_val")
    assert all(path.startswith(os.path.join(root, "Images") + os.sep) for path, _ in splits.train)
    root = make_fgvc(str(tmp_path / "cars"))
    for name in os.listdir(os.path.join(root, "images")):
        os.rename(os.path.join(root, "images", name), os.path.join(root, name))
    os.rmdir(os.path.join(root, "images"))
    assert all(os.path.isfile(path) for path, _ in load_splits(root, "trainval_test").eval)
    os.remove(load_splits(root, "train_val").train[0][0])
    _expect(r"train\.json: image '.*' is under none of", load_splits, root, "train_val")
