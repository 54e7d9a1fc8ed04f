"""MNIST as the MaskTune paper's two classes: torchvision's raw files (``MNIST/raw/*-ubyte``, downloaded when
missing), digits 0-4 as class 0 and 5-9 as class 1, each 28x28 digit padded to 32x32 RGB."""

import gzip
import os

import numpy as np
import torch

from masktune.console import UserError, check
from masktune.images import ImageSet

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: str, magic: int) -> np.ndarray:
    """An MNIST idx file (plain or .gz): big-endian magic number, dimensions, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        dims = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
        check(
            int.from_bytes(raw[:4], "big") == magic and len(raw) == 4 + 4 * dims + int(np.prod(shape)),
            f"{path!r} is not a complete MNIST idx file",
        )
    except (OSError, IndexError, EOFError) as e:
        raise UserError(f"cannot read MNIST file {path!r} ({type(e).__name__})") from None
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_mnist(data_dir: str, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """MNIST as the paper's two classes: digits 0-4 are class 0, 5-9 class 1; 28x28 padded to 32x32 RGB."""
    raw = os.path.join(data_dir, "MNIST", "raw")

    def find(name: str) -> str:
        return next(
            (p for p in (os.path.join(raw, name), os.path.join(raw, name + ".gz")) if os.path.isfile(p)), ""
        )

    if download and not all(find(f) for files in MNIST_FILES.values() for f in files):
        try:
            from torchvision.datasets import MNIST  # imported only to download: it is slow to import

            MNIST(root=data_dir, train=True, download=True)
        except Exception:
            pass  # the check below says where the files go
    missing = [f for files in MNIST_FILES.values() for f in files if not find(f)]
    check(
        not missing,
        f"MNIST not found and not downloadable: put {', '.join(missing)} (torchvision's raw "
        f"files) into {os.path.abspath(raw)}/",
    )
    splits = []
    for images_file, labels_file in MNIST_FILES.values():
        digits = torch.from_numpy(_read_idx(find(images_file), 2051).copy())
        labels = torch.from_numpy(_read_idx(find(labels_file), 2049).astype(np.int64))
        check(
            digits.shape[1:] == (28, 28) and len(digits) == len(labels), f"{raw!r}: MNIST files do not match"
        )
        images = torch.nn.functional.pad(digits, (2, 2, 2, 2))[:, None].expand(-1, 3, -1, -1).contiguous()
        splits.append(ImageSet(images, (labels >= 5).long(), ["0-4", "5-9"]))
    return splits[0], splits[1]
