"""Image data as uint8 tensors in memory, and the batched tensor ops that feed the models.

Sources: the official CIFAR-10 python pickles (downloaded by torchvision into ``data_dir`` when missing) or
any ImageFolder tree ``data_dir/{train,test}/<class>/<image>``. Either way a split is one ``ImageSet``: all
images as one ``(N, 3, H, W)`` uint8 tensor plus labels. Augmentation and normalisation are batched tensor
operations on the device; masking a data set produces just another uint8 tensor.
"""
import hashlib
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import atomic_save
from config import UserError, check, progress
from distributed import is_main

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


@dataclass
class ImageSet:
    images: torch.Tensor          # (N, 3, H, W) uint8
    labels: torch.Tensor          # (N,) int64 class indices, or (N, A) float 0/1 attributes
    classes: list                 # class (or attribute) names
    paths: list | None = None     # source file of each image, where the data has files
    indices: torch.Tensor | None = None  # position of each image in its original split
    patch_class: torch.Tensor | None = None  # spurious patch: the class whose colour it has, -1 for none

    def __post_init__(self):
        if self.indices is None:
            self.indices = torch.arange(len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        paths = [self.paths[i] for i in index.tolist()] if self.paths is not None else None
        return replace(self, images=self.images[index], labels=self.labels[index], paths=paths,
                       indices=self.indices[index],
                       patch_class=self.patch_class[index] if self.patch_class is not None else None)


# --- CIFAR-10 ------------------------------------------------------------------------------------

def _read_cifar_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise UserError(f"CIFAR-10 file {path!r} is missing; delete {os.path.dirname(path)!r} and run again "
                        "to re-download, or put a complete copy there") from None
    except Exception as e:  # truncated or corrupt pickle: any unpickling error
        raise UserError(f"CIFAR-10 file {path!r} is corrupt ({type(e).__name__}); delete it and put a "
                        "fresh copy there") from None


def _cifar_split(folder: str, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        batch = _read_cifar_pickle(os.path.join(folder, name))
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(torch.as_tensor(batch["labels"], dtype=torch.int64))
        except (KeyError, ValueError, TypeError):
            raise UserError(f"CIFAR-10 file {os.path.join(folder, name)!r} does not hold CIFAR-10 data") from None
        check(len(data) == len(labels[-1]), f"CIFAR-10 file {name!r} has mismatched images and labels")
        images.append(torch.from_numpy(data.copy()))
    return torch.cat(images), torch.cat(labels)


def load_cifar10(data_dir: str, download: bool = True) -> tuple[ImageSet, ImageSet]:
    """The official CIFAR-10 (python version) from ``data_dir``; downloaded there if missing."""
    folder = os.path.join(data_dir, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        archive = os.path.join(data_dir, CIFAR10_ARCHIVE)
        try:
            if os.path.isfile(archive):
                from torchvision.datasets.utils import extract_archive
                extract_archive(archive, data_dir)
            elif download:
                from torchvision.datasets import CIFAR10
                CIFAR10(root=data_dir, train=True, download=True)
        except Exception as e:
            reason = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise UserError(
                f"could not get CIFAR-10 ({reason}). Put {CIFAR10_ARCHIVE} (from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted folder {CIFAR10_FOLDER}/ into "
                f"{os.path.abspath(data_dir)}/, or set --data_dir to an ImageFolder tree with train/ and test/"
            ) from None
        check(os.path.isdir(folder), f"no {CIFAR10_FOLDER}/ in {data_dir!r} and download is off")
    meta = _read_cifar_pickle(os.path.join(folder, "batches.meta"))
    classes = list(meta.get("label_names", [])) if isinstance(meta, dict) else []
    check(len(classes) > 0, f"{os.path.join(folder, 'batches.meta')!r} has no label_names")
    train = _cifar_split(folder, [f"data_batch_{i}" for i in range(1, 6)])
    test = _cifar_split(folder, ["test_batch"])
    for labels in (train[1], test[1]):
        check(int(labels.min()) >= 0 and int(labels.max()) < len(classes), "CIFAR-10 labels out of range")
    return ImageSet(*train, classes), ImageSet(*test, classes)


# --- ImageFolder trees ---------------------------------------------------------------------------

def _list_image_folder(root: str) -> tuple[list[str], list[str], list[int]]:
    check(os.path.isdir(root), f"folder {root!r} not found")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    check(len(classes) > 0, f"{root!r} has no class folders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(f.path for f in os.scandir(os.path.join(root, name))
                       if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS))
        check(len(files) > 0, f"class folder {os.path.join(root, name)!r} has no images")
        paths += files
        labels += [label] * len(files)
    return classes, paths, labels


def read_images(paths: list[str], size: int | tuple[int, int], desc: str = "decoding",
                workers: int = 8) -> torch.Tensor:
    """Decode image files into one (N, 3, H, W) uint8 tensor, resizing where needed, with ``workers``
    threads (PIL releases the GIL while it decodes and resizes, so they run in parallel)."""
    from PIL import Image
    height, width = (size, size) if isinstance(size, int) else size

    def read(path: str) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
        except Exception as e:
            raise UserError(f"cannot read image {path!r} ({type(e).__name__}: {str(e)[:80]})") from None

    out = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        for i, array in enumerate(progress(pool.map(read, paths, chunksize=256), total=len(paths), desc=desc)):
            out[i] = array
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_image_folder(data_dir: str, image_size: int = 32) -> tuple[ImageSet, ImageSet]:
    """An ImageFolder tree ``data_dir/{train,test}/<class>/*``; images resized to image_size."""
    splits = []
    for split in ("train", "test"):
        classes, paths, labels = _list_image_folder(os.path.join(data_dir, split))
        images = read_images(paths, image_size, desc=f"decoding {split}")
        splits.append(ImageSet(images, torch.tensor(labels), classes, paths))
    check(splits[0].classes == splits[1].classes,
          f"train and test class folders differ in {data_dir!r}: {splits[0].classes} vs {splits[1].classes}")
    return splits[0], splits[1]


def load_classification_data(data_dir: str, image_size: int = 32) -> tuple[ImageSet, ImageSet]:
    """ImageFolder when ``data_dir`` has train/ and test/, else CIFAR-10 (downloaded when missing)."""
    if os.path.isdir(os.path.join(data_dir, "train")) or os.path.isdir(os.path.join(data_dir, "test")):
        return load_image_folder(data_dir, image_size)
    train, test = load_cifar10(data_dir)
    check(image_size == 32, "CIFAR-10 images are 32x32; set image_size=32")
    return train, test


def split_validation(train: ImageSet, val_size: int, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold out ``val_size`` random training images (fixed by ``seed``) for model and threshold selection."""
    if val_size == 0:
        return train, None
    check(0 < val_size < len(train), f"val_size={val_size} must be below the {len(train)} training images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:].sort().values), train.subset(order[:val_size].sort().values)


# --- batched tensor ops --------------------------------------------------------------------------

def normalize(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, scaled to [0, 1] then standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def augment_flip_crop(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random horizontal flips and random crops after reflect padding, for a whole batch at once."""
    n, _, height, width = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip, shifts = flip.to(images.device), shifts.to(images.device)
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
    if padding == 0:
        return images
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect").to(images.dtype)
    rows = shifts[0].view(-1, 1) + torch.arange(height, device=images.device)  # (B, H)
    cols = shifts[1].view(-1, 1) + torch.arange(width, device=images.device)   # (B, W)
    batch = torch.arange(n, device=images.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def batch_order(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches: a ``randperm`` shuffle when a generator is given, else in order. For ``n == 0``, one
    empty batch: a process with an empty share under torchrun still produces a (0, ...) output to gather."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


# --- spurious patch benchmark --------------------------------------------------------------------

SPURIOUS_POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")


def patch_palette(num_classes: int) -> torch.Tensor:
    """One saturated colour per class (hues evenly spaced): uint8 (C, 3)."""
    import colorsys
    return torch.tensor([[round(255 * v) for v in colorsys.hsv_to_rgb(c / num_classes, 1.0, 1.0)]
                         for c in range(num_classes)], dtype=torch.uint8)


def stamp_patches(images: torch.Tensor, patch_class: torch.Tensor, size: int, position: str) -> torch.Tensor:
    """Copy of ``images`` with a solid ``size`` x ``size`` square of colour ``patch_class`` (none where -1)."""
    check(position in SPURIOUS_POSITIONS, f"unknown spurious_position {position!r}; use one of {SPURIOUS_POSITIONS}")
    height, width = images.shape[-2:]
    check(0 < size <= min(height, width), f"spurious_patch_size must be between 1 and {min(height, width)}")
    row = 0 if position.startswith("top") else height - size
    col = 0 if position.endswith("left") else width - size
    out = images.clone()
    stamped = patch_class >= 0
    colours = patch_palette(int(patch_class.max()) + 1 if stamped.any() else 1)
    out[stamped, :, row:row + size, col:col + size] = colours[patch_class[stamped]].view(-1, 3, 1, 1).to(out.device)
    return out


def spurious_training_classes(labels: torch.Tensor, num_classes: int, ratio: float, conflicting: str,
                              generator: torch.Generator) -> torch.Tensor:
    """Patch colour of each training image: exactly round(ratio * n_c) images of each class c get colour c,
    the others another class's colour (``conflicting = "other"``) or no patch (``"none"``)."""
    check(conflicting in ("other", "none"), f"spurious_conflicting must be 'other' or 'none', got {conflicting!r}")
    patch_class = torch.full_like(labels, -1)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        aligned = round(ratio * len(members))
        patch_class[members[:aligned]] = c
        rest = members[aligned:]
        if conflicting == "other" and len(rest):
            patch_class[rest] = (c + torch.randint(1, num_classes, (len(rest),), generator=generator)) % num_classes
    return patch_class


def spurious_test_sets(test: ImageSet, config: dict) -> dict[str, ImageSet]:
    """clean (no patch), aligned (patch of the true class), conflicting (patch of another class)."""
    num_classes = len(test.classes)
    generator = torch.Generator().manual_seed(config["seed"] + 1000)
    classes = {"clean": torch.full_like(test.labels, -1), "aligned": test.labels.clone(),
               "conflicting": (test.labels + torch.randint(1, num_classes, test.labels.shape, generator=generator))
               % num_classes}
    size, position = config["spurious_patch_size"], config["spurious_position"]
    return {name: replace(test, images=stamp_patches(test.images, c, size, position) if name != "clean"
                          else test.images, patch_class=c) for name, c in classes.items()}


def experiment_data(config: dict) -> tuple[ImageSet, ImageSet | None, ImageSet]:
    """train, validation and test sets of a VGG run, rebuilt identically from a run's config
    (so evaluation reads the split from the checkpoint instead of retyped flags)."""
    train, test = load_classification_data(config["data_dir"], config.get("image_size", 32))
    if config.get("dry_run"):  # a few hundred images: checks the whole pipeline in seconds
        pick = torch.Generator().manual_seed(config["seed"])
        train = train.subset(torch.randperm(len(train), generator=pick)[:512].sort().values)
        test = test.subset(torch.randperm(len(test), generator=pick)[:256].sort().values)
    val_size = min(config["val_size"], len(train) // 10) if config.get("dry_run") else config["val_size"]
    if config.get("spurious_ratio", 0) > 0:  # the shortcut is planted before the split: validation is biased too
        check(config["spurious_ratio"] <= 1, "spurious_ratio must be in [0, 1]")
        patch_class = spurious_training_classes(train.labels, len(train.classes), config["spurious_ratio"],
                                                config["spurious_conflicting"],
                                                torch.Generator().manual_seed(config["seed"] + 999))
        train = replace(train, images=stamp_patches(train.images, patch_class, config["spurious_patch_size"],
                                                    config["spurious_position"]), patch_class=patch_class)
    train, val = split_validation(train, val_size, config["seed"])
    return train, val, test


def read_group_csv(path: str, column: str, images: ImageSet, data_dir: str) -> list[str]:
    """Group label of each image from a CSV with a ``path`` column (absolute, or relative to data_dir)."""
    import csv
    check(images.paths is not None, "group_csv needs an ImageFolder data set (images with file paths)")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read group_csv {path!r}: {e.strerror}") from None
    check(rows and "path" in rows[0] and column in rows[0], f"group_csv {path!r} needs columns 'path' and {column!r}")
    by_path = {os.path.normpath(os.path.join(data_dir, r["path"])): r[column] for r in rows}
    missing = [p for p in images.paths if os.path.normpath(p) not in by_path]
    check(not missing, f"group_csv {path!r} has no row for {len(missing)} test images, e.g. {missing[0]!r}")
    return [by_path[os.path.normpath(p)] for p in images.paths]


# --- CelebA --------------------------------------------------------------------------------------

def _celeba_files(data_dir: str) -> tuple[str, str, str]:
    """(attribute file, partition file, image folder) for the Kaggle archive or torchvision's layout."""
    for root in (data_dir, os.path.join(data_dir, "archive"), os.path.join(data_dir, "celeba")):
        for ext in ("csv", "txt"):
            attributes = os.path.join(root, f"list_attr_celeba.{ext}")
            partition = os.path.join(root, f"list_eval_partition.{ext}")
            if os.path.isfile(attributes) and os.path.isfile(partition):
                for images in (os.path.join(root, "img_align_celeba", "img_align_celeba"),
                               os.path.join(root, "img_align_celeba")):
                    if os.path.isdir(images):
                        return attributes, partition, images
                raise UserError(f"CelebA images not found: expected {root}/img_align_celeba/ (Kaggle: "
                                "img_align_celeba/img_align_celeba/) with the .jpg files")
    raise UserError(f"CelebA not found in {data_dir!r}: put the Kaggle archive there (list_attr_celeba.csv, "
                    "list_eval_partition.csv, img_align_celeba/) or torchvision's files (list_attr_celeba.txt, "
                    "list_eval_partition.txt, img_align_celeba/); see the README")


def read_celeba_tables(attributes_path: str, partition_path: str) -> tuple[list[str], list[str], torch.Tensor, dict]:
    """(image ids, attribute names, 0/1 attribute tensor (N, 40), {image id: partition 0/1/2}).

    Reads the Kaggle CSVs (``image_id,<attr>...`` / ``image_id,partition``) and torchvision's TXT files
    (a count line, a line of attribute names, then ``<id> -1 1 ...`` / ``<id> <partition>``).
    """
    def rows(path: str) -> list[list[str]]:
        try:
            with open(path) as f:
                lines = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path!r} ({type(e).__name__})") from None
        return [line.replace(",", " ").split() for line in lines]

    attr_rows = rows(attributes_path)
    if attributes_path.endswith(".csv"):
        check(attr_rows and attr_rows[0][0] == "image_id", f"{attributes_path!r} should start with an image_id header")
        names, body = attr_rows[0][1:], attr_rows[1:]
    else:
        check(len(attr_rows) >= 2, f"{attributes_path!r} is too short to be list_attr_celeba.txt")
        names, body = attr_rows[1], attr_rows[2:]
    check(len(names) > 0 and len(body) > 0, f"{attributes_path!r} lists no attributes or no images")
    try:
        values = torch.tensor([[int(v) for v in r[1:]] for r in body])
    except ValueError:
        raise UserError(f"{attributes_path!r} has a non-integer attribute value") from None
    check(values.shape[1] == len(names), f"{attributes_path!r}: rows do not have {len(names)} attribute values")
    check(bool(((values == 1) | (values == -1) | (values == 0)).all()), f"{attributes_path!r}: values must be -1/1")
    partition_rows = rows(partition_path)
    if partition_rows and partition_rows[0][0] == "image_id":
        partition_rows = partition_rows[1:]
    try:
        partition = {r[0]: int(r[1]) for r in partition_rows}
    except (IndexError, ValueError):
        raise UserError(f"{partition_path!r} is malformed (expected '<image id> <0|1|2>' per line)") from None
    return [r[0] for r in body], names, (values == 1).float(), partition


def read_images_cropped(paths: list[str], size: int, desc: str, workers: int = 8, cache_dir: str = "") -> torch.Tensor:
    """Resize the shorter side to ``size`` and centre-crop (torchvision's Resize + CenterCrop).

    With ``cache_dir`` the decoded uint8 tensor is kept there (one file per list of paths and size) and read
    back instead of decoding on later runs.
    """
    cache = ""
    if cache_dir:
        key = hashlib.sha1(f"{size}\n".encode() + "\n".join(paths).encode()).hexdigest()[:16]
        cache = os.path.join(cache_dir, f"images-{size}px-{len(paths)}-{key}.pt")
        if os.path.exists(cache):
            try:
                return torch.load(cache, weights_only=True)
            except Exception as e:  # a damaged cache is rebuilt, never trusted
                print(f"cache {cache!r} unreadable ({type(e).__name__}); decoding again")
    images = _decode_cropped(paths, size, desc, workers)
    if cache and is_main():
        atomic_save(images, cache)
    return images


def _decode_cropped(paths: list[str], size: int, desc: str, workers: int) -> torch.Tensor:
    from PIL import Image
    first = Image.open(paths[0]) if paths else None
    check(first is not None, "no images to read")
    width, height = first.size
    scale = size / min(width, height)
    resized = (max(size, round(height * scale)), max(size, round(width * scale)))
    images = read_images(paths, resized, desc, workers)
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    return images[:, :, top:top + size, left:left + size].contiguous()


def load_celeba(data_dir: str, target_attributes: list[str], spurious_attribute: str, image_size: int,
                subset_size: int, eval_subset_size: int, seed: int, workers: int = 8,
                cache_dir: str = "") -> dict[str, ImageSet]:
    """CelebA's official train/valid/test partitions as ImageSets with 0/1 attribute labels.

    ``subset_size`` / ``eval_subset_size`` > 0 keep a random subset (fixed by ``seed``) of the training /
    validation and test images: decoded at ``image_size`` every image is held in memory.
    ``patch_class`` holds the spurious attribute (0/1) of each image. ``workers`` decoding threads;
    ``cache_dir`` keeps the decoded images for the next run (see ``read_images_cropped``).
    """
    attributes_path, partition_path, image_dir = _celeba_files(data_dir)
    ids, names, values, partition = read_celeba_tables(attributes_path, partition_path)
    unknown = [a for a in [*target_attributes, spurious_attribute] if a not in names]
    check(not unknown, f"unknown CelebA attribute(s) {unknown}; known: {', '.join(names)}")
    check(len(target_attributes) > 0, "target_attributes must name at least one attribute")
    columns = [names.index(a) for a in target_attributes]
    spurious = values[:, names.index(spurious_attribute)].long()
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        index = torch.tensor([i for i, image_id in enumerate(ids) if partition.get(image_id) == code], dtype=torch.long)
        check(len(index) > 0, f"CelebA partition {split} is empty in {partition_path!r}")
        limit = subset_size if split == "train" else eval_subset_size
        if 0 < limit < len(index):
            index = index[torch.randperm(len(index), generator=generator)[:limit]].sort().values
        paths = [os.path.join(image_dir, ids[i]) for i in index.tolist()]
        splits[split] = ImageSet(read_images_cropped(paths, image_size, f"decoding CelebA {split}", workers, cache_dir),
                                 values[index][:, columns], list(target_attributes), paths, index,
                                 patch_class=spurious[index])
    return splits
