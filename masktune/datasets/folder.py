"""Image folder trees: ``train/<class>/*``, optional ``val/<class>/*``, ``test/<class>/*``, and a group CSV
with the group of each validation and test image."""

import csv
import os

import torch

from masktune.console import UserError, check
from masktune.images import FileList, list_image_files


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
