"""The data sets, recognised from ``data_dir`` and loaded as train / validation / test ``ImageSet``s.

  cifar10     the official python pickles (see cifar10.py), downloaded when missing
  mnist       torchvision's raw files, as the MaskTune paper's two classes (see mnist.py)
  folder      ``train/<class>/*``, optional ``val/<class>/*``, ``test/<class>/*``; with ``group_csv``, group
              labels for validation and test images (columns ``path`` and ``group_column``)
  waterbirds  ``metadata.csv`` and species folders (see waterbirds.py)
  celeba      CelebA attributes (see celeba.py)
``experiment_data`` turns a run's config into its exact splits: the data set, a validation split where the
data set has none (``val_fraction``), and a planted shortcut (``shortcut``), so evaluation rebuilds them from
a checkpoint's config.
"""

import os
from dataclasses import replace

import torch

from masktune.console import check, check_choice
from masktune.datasets.celeba import celeba_files, list_celeba
from masktune.datasets.cifar10 import CIFAR10_ARCHIVE, CIFAR10_FOLDER, load_cifar10
from masktune.datasets.folder import list_image_folder
from masktune.datasets.mnist import load_mnist
from masktune.datasets.waterbirds import list_waterbirds
from masktune.images import ImageSet, split_validation
from masktune.seeds import stream
from masktune.shortcuts import base_images, plant

DATASETS = ("auto", "cifar10", "mnist", "folder", "waterbirds", "celeba")


def recognise(data_dir: str) -> str:
    """Which data set ``data_dir`` holds ("" when none is recognised)."""

    def has(*parts):
        return os.path.exists(os.path.join(data_dir, *parts))

    if has("train") or has("test"):
        return "folder"
    if has("metadata.csv"):
        return "waterbirds"
    if celeba_files(data_dir) is not None:
        return "celeba"
    if has("MNIST", "raw"):
        return "mnist"
    if has(CIFAR10_FOLDER) or has(CIFAR10_ARCHIVE):
        return "cifar10"
    return ""


def load_splits(config: dict, fallback: str = "") -> tuple[ImageSet, ImageSet | None, ImageSet]:
    """train, validation (None where the data set has no validation split) and test sets of ``config``'s
    data set: ``dataset`` names it, or ``auto`` recognises it in ``data_dir`` (``fallback`` when nothing
    is there)."""
    data_dir, dataset = config["data_dir"], config.get("dataset", "auto")
    check_choice("dataset", dataset, DATASETS)
    if dataset == "auto":
        dataset = recognise(data_dir) or fallback
        check(
            dataset != "",
            f"no data set recognised in {data_dir!r}: expected CelebA (list_attr_celeba.csv ...), "
            "Waterbirds (metadata.csv), or an image folder tree train/<class>/*, test/<class>/* (see README)",
        )
    size = config.get("image_size", 32)
    check(dataset not in ("cifar10", "mnist") or size == 32, f"{dataset} images are 32x32; set image_size=32")
    if dataset == "cifar10":
        return _with_no_val(load_cifar10(data_dir))
    if dataset == "mnist":
        return _with_no_val(load_mnist(data_dir))
    if dataset == "folder":
        files = list_image_folder(data_dir, config.get("group_csv", ""), config.get("group_column", "group"))
    else:
        files = list_waterbirds(data_dir) if dataset == "waterbirds" else list_celeba(config)
    generator = torch.Generator().manual_seed(config["seed"])  # random subsets, chosen before decoding
    limits = (
        config.get("subset_size", 0),
        config.get("eval_subset_size", 0),
        config.get("eval_subset_size", 0),
    )
    return tuple(
        None
        if f is None
        else f.decode(size, limit, generator, f"decoding {split}", config.get("cache_dir", ""))
        for f, limit, split in zip(files, limits, ("train", "val", "test"))
    )


def _with_no_val(splits: tuple[ImageSet, ImageSet]) -> tuple[ImageSet, None, ImageSet]:
    return splits[0], None, splits[1]


def experiment_data(config: dict, fallback: str = "cifar10") -> tuple[ImageSet, ImageSet, ImageSet]:
    """The train, validation and test sets of a run, rebuilt identically from its config."""
    train, val, test = load_splits(config, fallback)
    if not train.labels.is_floating_point():  # multi-label sets (CelebA's attributes) are exempt
        only = train.classes[int(train.labels[0])]
        check(
            len(train.labels.unique()) > 1,
            f"every training image in {config['data_dir']!r} is of class {only}: "
            "a classifier needs two classes or more",
        )
    if config.get("dry_run"):  # a few hundred images: checks the whole pipeline in seconds
        pick = torch.Generator().manual_seed(config["seed"])
        train = train.subset(torch.randperm(len(train), generator=pick)[:512].sort().values)
        test = test.subset(torch.randperm(len(test), generator=pick)[:256].sort().values)
        val = val.subset(torch.randperm(len(val), generator=pick)[:128].sort().values) if val else None
    if val is None:
        train, val = split_validation(train, config["val_fraction"], config["seed"])
    if config.get("shortcut"):  # planted in training and validation images alike
        check(
            not train.labels.is_floating_point(),
            f"shortcut {config['shortcut']!r} needs classes: {config['data_dir']!r} has attributes",
        )
        train, val, test = (replace(s, images=base_images(s.images, config)) for s in (train, val, test))
        train = plant(train, config, stream(config["seed"], "train_shortcut"))
        val = plant(val, config, stream(config["seed"], "val_shortcut"))
    return train, val, test
