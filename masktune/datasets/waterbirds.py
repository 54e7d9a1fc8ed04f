"""Waterbirds in the layout that group_DRO's generator and WILDS distribute: ``metadata.csv`` with columns
``img_id, img_filename, y, split, place`` (and ``place_filename``), images under species folders.

``split`` 0/1/2 = train/val/test; the target ``y`` is 1 for a waterbird; the spurious attribute ``place`` is
1 for a water background. Groups are (bird, place); papers report the worst group and the test average
weighted by the training groups' proportions.
"""

import csv
import os

import torch

from masktune.console import UserError, check
from masktune.images import FileList

COLUMNS = ("img_id", "img_filename", "y", "split", "place")
CLASSES = ["landbird", "waterbird"]
PLACES = ["land", "water"]


def list_waterbirds(data_dir: str) -> tuple[FileList, FileList, FileList]:
    """The train, val and test splits of ``data_dir/metadata.csv``."""
    path = os.path.join(data_dir, "metadata.csv")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path!r} ({type(e).__name__})") from None
    check(len(rows) > 0, f"{path!r} lists no images")
    missing = [c for c in COLUMNS if c not in rows[0]]
    check(not missing, f"{path!r} lacks the column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)})")
    for line, row in enumerate(rows, start=2):
        for column, allowed in (("split", "012"), ("y", "01"), ("place", "01")):
            check(
                row[column].strip() in allowed and row[column].strip() != "",
                f"{path!r} line {line}: {column} must be one of {', '.join(allowed)}, got {row[column]!r}",
            )
    splits = []
    for code in "012":
        chosen = [r for r in rows if r["split"].strip() == code]
        check(len(chosen) > 0, f"{path!r} has no images in split {code} (0/1/2 = train/val/test)")
        paths = [os.path.join(data_dir, r["img_filename"]) for r in chosen]
        absent = [p for p in paths if not os.path.isfile(p)]
        check(
            not absent,
            f"{path!r} lists {len(absent)} images that are not there, e.g. {(absent or [''])[0]!r}",
        )
        splits.append(
            FileList(
                paths,
                torch.tensor([int(r["y"]) for r in chosen]),
                CLASSES,
                torch.tensor([int(r["place"]) for r in chosen]),
                PLACES,
            )
        )
    return splits[0], splits[1], splits[2]
