"""Image data as uint8 tensors in memory: a split as one ``ImageSet``, and image files decoded into it.

A split of a data set is one ``ImageSet``: all its images as one ``(N, 3, H, W)`` uint8 tensor (on the GPU
when there is one), its labels, and, where known, each image's spurious attribute (the shortcut's marker,
CelebA's Male, Waterbirds' place, a group CSV's value). The batched operations on them are in batches.py.
"""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from masktune.checkpoint import atomic_save
from masktune.console import UserError, check, progress
from masktune.distributed import is_main

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64 class indices, or (N, A) float 0/1 attributes
    classes: list  # class (or attribute) names
    paths: list | None = None  # source file of each image, where the data has files
    indices: torch.Tensor | None = None  # position of each image in its original split
    spurious: torch.Tensor | None = None  # (N,) int64 spurious attribute of each image, -1 where unknown
    spurious_names: list | None = None  # the name of each spurious value
    unmarked: torch.Tensor | None = None  # a planted shortcut: the images before it was planted

    def __post_init__(self):
        if self.indices is None:
            self.indices = torch.arange(len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        def pick(x):
            return None if x is None else [x[i] for i in index.tolist()] if isinstance(x, list) else x[index]

        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            paths=pick(self.paths),
            indices=self.indices[index],
            spurious=pick(self.spurious),
            unmarked=pick(self.unmarked),
        )

    def groups(self) -> list[str]:
        """Each image's group: its class and its spurious attribute."""
        check(self.spurious is not None, "this data set has no spurious attribute: no groups")
        return [
            f"{self.classes[int(y)]}, {self.spurious_names[int(s)] if s >= 0 else 'none'}"
            for y, s in zip(self.labels.tolist(), self.spurious.tolist())
        ]


@dataclass
class FileList:
    """A split of a data set stored as image files, before decoding."""

    paths: list[str]
    labels: torch.Tensor
    classes: list
    spurious: torch.Tensor | None = None
    spurious_names: list | None = None

    def decode(
        self, size: int, limit: int, generator: torch.Generator, desc: str, cache_dir: str = ""
    ) -> ImageSet:
        """The images decoded at ``size`` (see ``read_images``); ``limit`` > 0 keeps that many, at random."""
        index = torch.arange(len(self.paths))
        if 0 < limit < len(index):
            index = index[torch.randperm(len(index), generator=generator)[:limit]].sort().values
        paths = [self.paths[i] for i in index.tolist()]
        return ImageSet(
            read_images(paths, size, desc, cache_dir),
            self.labels[index],
            self.classes,
            paths,
            index,
            None if self.spurious is None else self.spurious[index],
            self.spurious_names,
        )


def split_validation(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out a random ``fraction`` of the training images (fixed by ``seed``) for model and threshold
    selection: (train, validation)."""
    size = round(fraction * len(train))
    check(
        0 < size < len(train),
        f"val_fraction={fraction} leaves no validation or no training images out of {len(train)}",
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[size:].sort().values), train.subset(order[:size].sort().values)


# --- image files -> one uint8 tensor ---------------------------------------------------------------------


def read_images(paths: list[str], size: int, desc: str = "decoding", cache_dir: str = "") -> torch.Tensor:
    """Decode image files into one (N, 3, size, size) uint8 tensor: the shorter side resized to ``size``,
    then centre-cropped (torchvision's Resize + CenterCrop); images already at that size are untouched.

    Threads decode in parallel (PIL releases the GIL). With ``cache_dir`` the tensor is kept there (one file
    per list of paths and size) and read back on later runs instead of decoding; a damaged cache file is
    decoded again.
    """
    check(len(paths) > 0, "no images to read")
    cache = ""
    if cache_dir:
        key = hashlib.sha1(f"{size}\n".encode() + "\n".join(paths).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"images-{size}px-{len(paths)}-{key}.pt")
        if os.path.exists(cache):
            try:
                return torch.load(cache, weights_only=True)
            except Exception as e:
                print(f"cache {cache!r} unreadable ({type(e).__name__}); decoding again")
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = pool.map(lambda path: _read_image(path, size), paths, chunksize=64)
        for i, array in enumerate(progress(decoded, total=len(paths), desc=desc)):
            out[i] = array
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    if cache and is_main():
        atomic_save(images, cache)
    return images


def _read_image(path: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            if (width, height) != (size, size):
                scale = size / min(width, height)
                width, height = max(size, round(width * scale)), max(size, round(height * scale))
                image = image.resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as e:
        raise UserError(f"cannot read image {path!r} ({type(e).__name__}: {str(e)[:80]})") from None
    top, left = (height - size) // 2, (width - size) // 2
    return array[top : top + size, left : left + size]


def list_image_files(folder: str) -> list[str]:
    return sorted(
        f.path for f in os.scandir(folder) if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)
    )
