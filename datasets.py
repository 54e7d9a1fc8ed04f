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

import csv
import os
from dataclasses import replace

import torch

from celeba import celeba_files, list_celeba
from cifar10 import CIFAR10_ARCHIVE, CIFAR10_FOLDER, load_cifar10
from console import UserError, check, check_choice
from data import FileList, ImageSet, list_image_files, split_validation
from mnist import load_mnist
from shortcuts import base_images, plant
from waterbirds import list_waterbirds

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
    if config.get("dry_run"):  # a few hundred images: checks the whole pipeline in seconds
        pick = torch.Generator().manual_seed(config["seed"])
        train = train.subset(torch.randperm(len(train), generator=pick)[:512].sort().values)
        test = test.subset(torch.randperm(len(test), generator=pick)[:256].sort().values)
        val = val.subset(torch.randperm(len(val), generator=pick)[:128].sort().values) if val else None
    if val is None:
        train, val = split_validation(train, config["val_fraction"], config["seed"])
    if config.get("shortcut"):  # planted in training and validation images alike
        train, val, test = (replace(s, images=base_images(s.images, config)) for s in (train, val, test))
        train = plant(train, config, config["seed"] + 999)
        val = plant(val, config, config["seed"] + 998)
    return train, val, test


# --- image folder trees ----------------------------------------------------------------------------------


def _list_classes(root: str) -> tuple[list[str], list[str], list[int]]:
    check(os.path.isdir(root), f"folder {root!r} not found")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    check(len(classes) > 0, f"{root!r} has no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = list_image_files(os.path.join(root, name))
        check(len(files) > 0, f"class folder {os.path.join(root, name)!r} has no images")
        paths += files
        labels += [label] * len(files)
    return classes, paths, labels


def list_image_folder(
    data_dir: str, group_csv: str = "", group_column: str = "group"
) -> tuple[FileList, FileList | None, FileList]:
    """``data_dir/{train,val,test}/<class>/*`` (val optional); with ``group_csv``, each validation and test
    image's group."""
    check(
        os.path.isdir(os.path.join(data_dir, "test")),
        f"{os.path.join(data_dir, 'test')!r} not found: an image "
        "folder tree needs train/<class>/* and test/<class>/*",
    )
    splits = {}
    for split in ("train", "val", "test"):
        if split == "val" and not os.path.isdir(os.path.join(data_dir, "val")):
            splits[split] = None
            continue
        classes, paths, labels = _list_classes(os.path.join(data_dir, split))
        if split != "train":
            check(
                classes == splits["train"].classes,
                f"{split} and train class folders differ in {data_dir!r}: {classes} vs "
                f"{splits['train'].classes}",
            )
        splits[split] = FileList(paths, torch.tensor(labels), classes)
    if group_csv:
        add_groups(group_csv, group_column, data_dir, [s for s in (splits["val"], splits["test"]) if s])
    return splits["train"], splits["val"], splits["test"]


def add_groups(path: str, column: str, data_dir: str, splits: list[FileList]) -> None:
    """Set each image's spurious attribute from a CSV with a ``path`` column (relative to ``data_dir`` or
    absolute) and a ``column`` of group values: every test image needs a row, every row an image."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read group_csv {path!r}: {e.strerror}") from None
    check(
        rows and "path" in rows[0] and column in rows[0],
        f"group_csv {path!r} needs columns 'path' and {column!r}",
    )
    by_path = {os.path.normpath(os.path.join(data_dir, r["path"])): r[column] for r in rows}
    known = {os.path.normpath(p) for s in splits for p in s.paths}
    unknown = [p for p in by_path if p not in known]
    check(
        not unknown,
        f"group_csv {path!r} names {len(unknown)} files that are not validation or test images, "
        f"e.g. {(unknown or [''])[0]!r}",
    )
    names = sorted(set(by_path.values()))
    for files in splits:
        values = [by_path.get(os.path.normpath(p)) for p in files.paths]
        missing = [p for p, v in zip(files.paths, values) if v is None]
        optional = files is not splits[-1] and len(missing) == len(values)  # validation images: all or none
        check(
            not missing or optional,
            f"group_csv {path!r} has no row for {len(missing)} images, e.g. {(missing or [''])[0]!r}",
        )
        files.spurious = torch.tensor([names.index(v) if v is not None else -1 for v in values])
        files.spurious_names = names
