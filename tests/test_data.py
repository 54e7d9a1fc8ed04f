"""Loading every data set into uint8 tensors, validation splits, batched augmentation."""

import hashlib
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSES, write_cifar_pickles, write_image_folder, write_mnist, write_waterbirds
from masktune.batches import draw_epoch, flip_crop
from masktune.console import UserError
from masktune.datasets import experiment_data, list_image_folder, load_splits, recognise
from masktune.datasets.cifar10 import load_cifar10
from masktune.datasets.mnist import load_mnist
from masktune.images import read_images, split_validation


def test_cifar_pickles_load_as_uint8_tensors(cifar_dir):
    train, test = load_cifar10(cifar_dir, download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (300, 3, 32, 32)
    assert test.images.shape == (100, 3, 32, 32) and train.classes == CLASSES
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert recognise(cifar_dir) == "cifar10"


def test_image_folder_loads_classes_and_paths_pixel_exact(folder_dir):
    train, val, test = load_splits({"data_dir": folder_dir, "seed": 0})
    assert train.classes == ["cat", "dog", "frog"] and len(train) == 120 and len(test) == 36 and val is None
    assert train.paths[0].endswith(os.path.join("train", "cat", "0000.png"))
    first = np.asarray(Image.open(train.paths[0]).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(train.images[0], torch.from_numpy(first.copy()))


def test_decoding_resizes_the_shorter_side_and_centre_crops(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = 255  # the centre 40x40 is white, the sides black
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    image = read_images([str(tmp_path / "wide.png")], 20)
    assert image.shape == (1, 3, 20, 20) and (image[..., 1:-1] > 250).all()  # bilinear blurs the edge columns


def test_validation_fraction_is_disjoint_reproducible_and_fits_small_folders(tmp_path, cifar_dir):
    train, _ = load_cifar10(cifar_dir, download=False)
    a_train, a_val = split_validation(train, 0.1, seed=5)
    b_train, b_val = split_validation(train, 0.1, seed=5)
    assert torch.equal(a_val.indices, b_val.indices) and len(a_val) == 30 and len(a_train) == 270
    assert not set(a_val.indices.tolist()) & set(a_train.indices.tolist())
    assert torch.equal(
        experiment_data({"data_dir": cifar_dir, "seed": 5, "val_fraction": 0.1})[1].indices, a_val.indices
    )
    small = write_image_folder(str(tmp_path / "small"), per_class=7, per_class_test=2)  # 21 training images
    train, val, _ = experiment_data({"data_dir": small, "seed": 0, "val_fraction": 0.1})
    assert (len(train), len(val)) == (19, 2)
    with pytest.raises(UserError, match="val_fraction=0.01 leaves no validation"):
        experiment_data({"data_dir": small, "seed": 0, "val_fraction": 0.01})


def test_image_folder_with_its_own_validation_split(tmp_path):
    root = write_image_folder(str(tmp_path), per_class=4, per_class_test=2)
    os.rename(tmp_path / "test", tmp_path / "val")
    write_image_folder(str(tmp_path / "again"), per_class=1, per_class_test=3)
    os.rename(tmp_path / "again" / "test", tmp_path / "test")
    train, val, test = experiment_data({"data_dir": root, "seed": 0, "val_fraction": 0.1})
    assert (len(train), len(val), len(test)) == (12, 6, 9)  # val/ is used as it is


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*cifar-10-batches-py"):
        load_cifar10(str(tmp_path))
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(UserError, match=r"MNIST not found.*train-images-idx3-ubyte.*MNIST/raw/$"):
        load_mnist(str(tmp_path))


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_raw_files_load_as_the_papers_two_classes_padded_to_32x32_rgb(tmp_path, compress):
    root = write_mnist(str(tmp_path), n_train=50, n_test=20, compress=compress)
    assert recognise(root) == "mnist"
    train, test = load_mnist(root, download=False)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.classes == ["0-4", "5-9"]
    raw = (
        open(os.path.join(root, "MNIST", "raw", "train-labels-idx1-ubyte"), "rb").read()
        if not compress
        else None
    )
    if raw is not None:
        digits = torch.tensor(list(raw[8:]))
        assert torch.equal(train.labels, (digits >= 5).long())
    assert (train.images[:, :, :2] == 0).all() and (
        train.images[:, :, :, 30:] == 0
    ).all()  # 2 black pixels around
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(
        train.images[:, 1], train.images[:, 2]
    )


def test_truncated_files_are_clear_errors(tmp_path):
    write_cifar_pickles(str(tmp_path / "c"), n_train=50, n_test=10)
    path = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="data_batch_3.*corrupt"):
        load_cifar10(str(tmp_path / "c"), download=False)
    root = write_mnist(str(tmp_path / "m"), n_train=10, n_test=10)
    path = tmp_path / "m" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="not a complete MNIST idx file"):
        load_mnist(root, download=False)


def test_image_folder_errors(tmp_path):
    root = write_image_folder(str(tmp_path / "a"), per_class=2, per_class_test=1)
    os.makedirs(os.path.join(root, "train", "empty"))
    with pytest.raises(UserError, match="has no images"):
        list_image_folder(root)
    os.rmdir(os.path.join(root, "train", "empty"))
    os.makedirs(os.path.join(root, "train", "zebra"))
    Image.new("RGB", (32, 32)).save(os.path.join(root, "train", "zebra", "0.png"))
    with pytest.raises(UserError, match="test and train class folders differ"):
        list_image_folder(root)
    bad = tmp_path / "c"
    write_image_folder(str(bad), per_class=2, per_class_test=1)
    (bad / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserError, match="cannot read image"):
        load_splits({"data_dir": str(bad), "seed": 0})
    one = write_image_folder(str(tmp_path / "one"), classes=["cat"], per_class=4, per_class_test=2)
    with pytest.raises(UserError, match="is of class cat: a classifier"):
        experiment_data({"data_dir": one, "seed": 0, "val_fraction": 0.25})


def test_group_csv_gives_groups_and_refuses_unknown_files(tmp_path):
    root = write_image_folder(str(tmp_path), per_class=3, per_class_test=2)
    _, _, test = load_splits({"data_dir": root, "seed": 0})
    rows = [f"{os.path.relpath(p, root)},{'water' if i % 2 else 'land'}" for i, p in enumerate(test.paths)]
    (tmp_path / "groups.csv").write_text("path,place\n" + "\n".join(rows) + "\n")
    config = {"data_dir": root, "seed": 0, "group_csv": str(tmp_path / "groups.csv"), "group_column": "place"}
    _, _, test = load_splits(config)
    assert test.spurious_names == ["land", "water"] and test.spurious.tolist() == [i % 2 for i in range(6)]
    assert test.groups()[:2] == ["cat, land", "cat, water"]
    (tmp_path / "groups.csv").write_text(
        "path,place\n" + "\n".join(rows + ["train/cat/0000.png,land"]) + "\n"
    )
    with pytest.raises(UserError, match="names 1 files that are not validation or test images"):
        load_splits(config)
    (tmp_path / "groups.csv").write_text("path,place\n" + "\n".join(rows[1:]) + "\n")
    with pytest.raises(UserError, match="has no row for 1 images"):
        load_splits(config)


def test_waterbirds_layout(tmp_path):
    root = write_waterbirds(str(tmp_path))
    assert recognise(root) == "waterbirds"
    train, val, test = load_splits({"data_dir": root, "seed": 0, "image_size": 32})
    assert (len(train), len(val), len(test)) == (28, 16, 16)
    assert train.images.shape == (28, 3, 32, 32) and train.classes == ["landbird", "waterbird"]
    assert train.groups().count("waterbird, water") == 12 and train.groups().count("landbird, water") == 2


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("place,place_filename", "where,place_filename"), "lacks the column(s) place"),
        (
            lambda t: t.replace("bird_0001.jpg,0,0,0", "bird_0001.jpg,0,7,0"),
            "line 2: split must be one of 0, 1, 2, got '7'",
        ),
        (lambda t: t.replace("bird_0001.jpg", "bird_9999.jpg"), "lists 1 images that are not there"),
    ],
)
def test_waterbirds_bad_metadata_is_one_line(tmp_path, edit, message):
    root = write_waterbirds(str(tmp_path))
    path = tmp_path / "metadata.csv"
    path.write_text(edit(path.read_text()))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_splits({"data_dir": root, "seed": 0, "image_size": 32})


def test_epoch_draws_are_reproducible_and_augmentation_label_preserving():
    a = draw_epoch(10, 4, torch.Generator().manual_seed(3), True, torch.device("cpu"))
    b = draw_epoch(10, 4, torch.Generator().manual_seed(3), True, torch.device("cpu"))
    assert [len(x.index) for x in a] == [4, 4, 2] and sorted(
        torch.cat([x.index for x in a]).tolist()
    ) == list(range(10))
    assert all(torch.equal(x.index, y.index) and torch.equal(x.shifts, y.shifts) for x, y in zip(a, b))
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).view(2, 3, 8, 8).to(torch.uint8)
    flipped = flip_crop(images, torch.tensor([True, False]), torch.full((2, 2), 2), padding=2)  # no shift
    assert torch.equal(flipped[0], images[0].flip(2)) and torch.equal(flipped[1], images[1])
    shifted = flip_crop(images, torch.tensor([False, False]), torch.tensor([[3, 2], [2, 2]]), padding=2)
    assert torch.equal(shifted[0, :, :-1], images[0, :, 1:])  # one row down in the padded image


def _write_pngs(folder, count=6, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i}.png")
        )
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


def test_the_cache_is_written_once_mapped_after_and_rebuilt_when_damaged(tmp_path, monkeypatch, capsys):
    import masktune.images as images_module

    paths = _write_pngs(str(tmp_path / "png"))
    decoded = read_images(paths, 8)
    cache_dir = str(tmp_path / "cache")
    assert torch.equal(read_images(paths, 8, cache_dir=cache_dir), decoded)
    (cache,) = os.listdir(cache_dir)  # one file, nothing partial left
    real_read = images_module._read_image
    monkeypatch.setattr(images_module, "_read_image", lambda *a: pytest.fail("decoded although cached"))
    mapped = read_images(paths, 8, cache_dir=cache_dir)
    assert torch.equal(mapped, decoded)
    mapped[0] = 0  # copy on write: the file keeps the images
    assert torch.equal(read_images(paths, 8, cache_dir=cache_dir), decoded)
    monkeypatch.setattr(images_module, "_read_image", real_read)
    del mapped  # no mapping of the file is left when it is cut short below
    path = os.path.join(cache_dir, cache)
    with open(path, "r+b") as f:  # a partial file (a copy cut short)
        f.truncate(os.path.getsize(path) // 2)
    assert torch.equal(read_images(paths, 8, cache_dir=cache_dir), decoded)
    assert "unreadable" in capsys.readouterr().out
    np.save(path, np.zeros((2, 3, 8, 8), np.uint8))  # images of another shape under the cache's name
    assert torch.equal(read_images(paths, 8, cache_dir=cache_dir), decoded)
    assert "not (6, 3, 8, 8)" in capsys.readouterr().out
    # another image in place of one of the files: another cache file, never the old images
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(paths[0])
    os.utime(paths[0], ns=(1, 1))
    assert (read_images(paths, 8, cache_dir=cache_dir)[0] == 7).all() and len(os.listdir(cache_dir)) == 2


def test_a_disk_too_small_for_the_cache_is_one_line_before_decoding(tmp_path, monkeypatch):
    import masktune.images as images_module

    paths = _write_pngs(str(tmp_path / "png"))
    monkeypatch.setattr(images_module, "_read_image", lambda *a: pytest.fail("decoding started"))
    monkeypatch.setattr(images_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(UserError, match="GB free and 6 decoded images need"):
        read_images(paths, 8, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


MAP_THE_CACHE = """
import hashlib, sys
from masktune.images import read_images
images = read_images(sys.argv[1:-1], 8, cache_dir=sys.argv[-1])
mapped = any(line.rstrip().endswith(".npy") for line in open("/proc/self/maps"))  # the file, not a copy
print(hashlib.sha1(images.numpy().tobytes()).hexdigest(), mapped)
"""


@pytest.mark.slow
def test_two_processes_map_one_cache_file(tmp_path):
    import subprocess
    import sys

    from conftest import child_env

    paths = _write_pngs(str(tmp_path / "png"))
    cache_dir = str(tmp_path / "cache")
    read_images(paths, 8, cache_dir=cache_dir)
    command = [sys.executable, "-c", MAP_THE_CACHE, *paths, cache_dir]
    env = child_env()
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [r.communicate(timeout=120)[0].split() for r in runs]
    expected = hashlib.sha1(read_images(paths, 8).numpy().tobytes()).hexdigest()
    assert outputs[0] == outputs[1] == [expected, "True"]
