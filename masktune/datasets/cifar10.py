"""CIFAR-10: the official python pickles (``cifar-10-batches-py/``), downloaded by torchvision when missing,
as uint8 tensors."""

import os
import pickle
import tarfile

import numpy as np
import torch

from masktune.console import UserError, check
from masktune.images import ImageSet

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"


def _read_cifar_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise UserError(
            f"CIFAR-10 file {path!r} is missing; delete {os.path.dirname(path)!r} and run again "
            "to re-download, or put a complete copy there"
        ) from None
    except Exception as e:  # truncated or corrupt pickle: any unpickling error
        raise UserError(
            f"CIFAR-10 file {path!r} is corrupt ({type(e).__name__}); delete it and put a fresh copy there"
        ) from None


def _cifar_split(folder: str, files: list[str], classes: list[str]) -> ImageSet:
    images, labels = [], []
    for name in files:
        batch = _read_cifar_pickle(os.path.join(folder, name))
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
        except (KeyError, ValueError, TypeError):
            raise UserError(
                f"CIFAR-10 file {os.path.join(folder, name)!r} does not hold CIFAR-10 data"
            ) from None
        check(len(data) == len(labels[-1]), f"CIFAR-10 file {name!r} has mismatched images and labels")
        images.append(torch.from_numpy(data.copy()))
    labels = torch.cat(labels)
    check(int(labels.min()) >= 0 and int(labels.max()) < len(classes), "CIFAR-10 labels out of range")
    return ImageSet(torch.cat(images), labels, classes)


def load_cifar10(data_dir: str, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """The official CIFAR-10 (python version) from ``data_dir``; downloaded there if missing."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
        try:
            if os.path.isfile(archive):
                with tarfile.open(archive) as tar:
                    tar.extractall(data_dir, filter="data")
            elif download:
                from torchvision.datasets import CIFAR10  # imported only to download: it is slow to import

                CIFAR10(root=data_dir, train=True, download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not get CIFAR-10 ({reason}). Put {CIFAR10_ARCHIVE} (from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted folder {CIFAR10_FOLDER}/ "
                f"into {os.path.abspath(data_dir)}/, or set --data_dir to an image folder (train/, test/)"
            ) from None
        check(os.path.isdir(folder), f"no {CIFAR10_FOLDER}/ in {data_dir!r} and download is off")
    meta = _read_cifar_pickle(os.path.join(folder, "batches.meta"))
    classes = list(meta.get("label_names", [])) if isinstance(meta, dict) else []
    check(len(classes) > 0, f"{os.path.join(folder, 'batches.meta')!r} has no label_names")
    return (
        _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)], classes),
        _cifar_split(folder, ["test_batch"], classes),
    )
