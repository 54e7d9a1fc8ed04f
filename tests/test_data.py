import os
import urllib.error

import pytest
import torch

from config import UserError
from conftest import CLASSES, write_cifar_pickles, write_image_folder
from data import augment_flip_crop, experiment_data, load_cifar10, load_classification_data, split_validation


def test_cifar_pickles_load_as_uint8_tensors(cifar_dir):
    train, test = load_cifar10(cifar_dir, download=False)
    assert train.images.dtype == torch.uint8 and train.images.shape == (300, 3, 32, 32)
    assert test.images.shape == (100, 3, 32, 32) and train.classes == CLASSES
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    assert train.paths is None


def test_image_folder_loads_classes_and_paths(folder_dir):
    train, test = load_classification_data(folder_dir)
    assert train.classes == ["cat", "dog", "frog"] and len(train) == 120 and len(test) == 36
    assert train.paths[0].endswith(os.path.join("train", "cat", "0000.png"))
    # pixel-exact for lossless files
    from PIL import Image
    import numpy as np
    first = np.asarray(Image.open(train.paths[0]).convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(train.images[0], torch.from_numpy(first.copy()))


def test_validation_split_is_disjoint_and_reproducible(cifar_dir):
    train, _ = load_cifar10(cifar_dir, download=False)
    a_train, a_val = split_validation(train, 30, seed=5)
    b_train, b_val = split_validation(train, 30, seed=5)
    assert torch.equal(a_val.indices, b_val.indices) and len(a_val) == 30 and len(a_train) == 270
    assert not set(a_val.indices.tolist()) & set(a_train.indices.tolist())
    config = {"data_dir": cifar_dir, "seed": 5, "val_size": 30}
    assert torch.equal(experiment_data(config)[1].indices, a_val.indices)


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*cifar-10-batches-py"):
        load_cifar10(str(tmp_path))


def test_truncated_pickle_is_a_clear_error(tmp_path):
    write_cifar_pickles(str(tmp_path), n_train=50, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="data_batch_3.*corrupt"):
        load_cifar10(str(tmp_path), download=False)


def test_image_folder_errors(tmp_path):
    root = write_image_folder(str(tmp_path / "a"), per_class=2, per_class_test=1)
    os.makedirs(os.path.join(root, "train", "empty"))
    with pytest.raises(UserError, match="has no images"):
        load_classification_data(root)
    os.rmdir(os.path.join(root, "train", "empty"))
    os.makedirs(os.path.join(root, "train", "zebra"))
    write_image_folder(str(tmp_path / "b"), classes=("zebra",), per_class=1, per_class_test=1)
    os.replace(str(tmp_path / "b" / "train" / "zebra" / "0000.png"), os.path.join(root, "train", "zebra", "0.png"))
    with pytest.raises(UserError, match="train and test class folders differ"):
        load_classification_data(root)
    bad = tmp_path / "c"
    write_image_folder(str(bad), per_class=2, per_class_test=1)
    (bad / "test" / "cat" / "0000.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UserError, match="cannot read image"):
        load_classification_data(str(bad))


def test_augmentation_is_batched_reproducible_and_label_preserving():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).view(2, 3, 8, 8).to(torch.uint8)
    a = augment_flip_crop(images, torch.Generator().manual_seed(3), padding=2)
    b = augment_flip_crop(images, torch.Generator().manual_seed(3), padding=2)
    assert torch.equal(a, b) and a.shape == images.shape and a.dtype == torch.uint8
    flipped = augment_flip_crop(images, torch.Generator().manual_seed(3), padding=0)
    for i in range(2):
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(2))
