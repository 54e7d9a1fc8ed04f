"""Image data as uint8 tensors (in memory, or memory-mapped from a cache file): a split as one ``ImageSet``,
and image files decoded into it.

A split of a data set is one ``ImageSet``: all its images as one ``(N, 3, H, W)`` uint8 tensor (on the GPU
when there is one), its labels, and, where known, each image's spurious attribute (the shortcut's marker,
CelebA's Male, Waterbirds' place, a group CSV's value). The batched operations on them are in batches.py.
"""

import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from masktune.console import UserError, check, progress
from masktune.distributed import barrier, is_main, my_range

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

    Threads decode in parallel (PIL releases the GIL), straight into the result. With ``cache_dir`` they are
    decoded once into a ``.npy`` file there, named by the size and the files' paths, sizes and times, and
    later runs memory-map it (copy on write): the processes of a node share one copy in the page cache, and
    data larger than memory is paged in as batches need it. Under torchrun each process decodes its own
    share of the files into the one cache file. A damaged cache file, or one of another shape, is decoded
    again with a notice.
    """
    check(len(paths) > 0, "no images to read")
    shape = (len(paths), 3, size, size)
    if not cache_dir:
        out = np.empty(shape, dtype=np.uint8)
        _decode_into(out, paths, desc)
        return torch.from_numpy(out)
    cache = cache_file(paths, size, cache_dir)
    missing = mapped_cache(cache, shape) is None
    barrier()  # every process has looked before any writes: they agree on whether to decode
    if missing:
        _write_cache(cache, paths, shape, desc)
    images = mapped_cache(cache, shape)
    check(images is not None, f"cache {cache!r} could not be read back after it was written")
    return images


def cache_file(paths: list[str], size: int, cache_dir: str) -> str:
    """The cache file of these image files at this size: another file list, size or file content (by each
    file's size and modification time) gets another name."""
    key = hashlib.sha1(f"{size}\n".encode())
    for path in paths:
        stat = os.stat(path)
        key.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return os.path.join(cache_dir, f"images-{size}px-{len(paths)}-{key.hexdigest()[:16]}.npy")


def mapped_cache(cache: str, shape: tuple) -> torch.Tensor | None:
    """The cache file memory-mapped as a uint8 tensor of ``shape``; None (with a notice where the file
    exists) when it is missing, damaged or of another shape."""
    if not os.path.exists(cache):
        return None
    try:
        array = np.load(cache, mmap_mode="c")  # copy on write: a change stays in this process
    except Exception as e:
        print(f"cache {cache!r} unreadable ({type(e).__name__}); decoding again")
        return None
    if array.shape != shape or array.dtype != np.uint8:
        print(
            f"cache {cache!r} holds {array.dtype} images of shape {array.shape}, not {shape}; decoding again"
        )
        return None
    return torch.from_numpy(array)


def _write_cache(cache: str, paths: list[str], shape: tuple, desc: str) -> None:
    """Decode into a new cache file, each process its ``my_range`` share (under torchrun; else all of it):
    checked against the free disk space first, written under a temporary name and renamed when complete, so
    that a cache file is never partial."""
    folder = os.path.dirname(os.path.abspath(cache))
    job = os.environ.get("TORCHELASTIC_RUN_ID", os.getpid())  # one name for a torchrun job's processes
    partial = f"{cache}.partial-{job}"
    try:
        if is_main():
            os.makedirs(folder, exist_ok=True)
            needed, free = int(np.prod(shape)) + 4096, shutil.disk_usage(folder).free
            check(
                needed < free,
                f"cache_dir {folder!r} has {free / 1e9:.2f} GB free and {shape[0]} decoded images need "
                f"{needed / 1e9:.2f} GB: free some space, or set cache_dir to another disk (or '')",
            )
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate"):  # reserve the blocks: a full disk fails here, not in a write
                with open(partial, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(partial))
        barrier()
        out, mine = np.load(partial, mmap_mode="r+"), my_range(len(paths))
        _decode_into(out[mine.start : mine.stop], paths[mine.start : mine.stop], desc)
        out.flush()
        del out
        barrier()
        if is_main():
            os.replace(partial, cache)
        barrier()
    except OSError as e:
        raise UserError(f"could not write the cache {cache}: {e.strerror or e}") from e
    finally:
        if is_main() and os.path.exists(partial):
            os.remove(partial)


def _decode_into(out: np.ndarray, paths: list[str], desc: str) -> None:
    """Decode ``paths`` into ``out`` (N, 3, size, size) with threads, image by image."""
    size = out.shape[-1]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        decoded = pool.map(lambda path: _read_image(path, size), paths, chunksize=64)
        for i, array in enumerate(progress(decoded, total=len(paths), desc=desc)):
            out[i] = array.transpose(2, 0, 1)


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
