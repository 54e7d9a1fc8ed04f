"""Tiny synthetic data sets in the real on-disk formats, written to temporary folders (never the network),
and helpers to run the scripts as a user does."""

import contextlib
import ctypes
import gc
import gzip
import io
import os
import pickle
import runpy
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pytest_configure(config):
    """Under pytest-xdist each worker takes its share of the cores: two workers with a thread per core
    each would oversubscribe them and run slower than one."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, torch.get_num_threads() // workers))  # torch's own count heeds affinity


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PATCH = 8  # side of the planted square


def planted_images(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Dim noise images whose class is decided only by where a bright square sits.

    Class c puts an 8x8 white square at one of 10 fixed places (the planted feature): uint8 (N, 3, H, W).
    """
    images = rng.integers(0, 60, size=(len(labels), 3, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        row, col = patch_corner(int(c), size)
        images[i, :, row : row + PATCH, col : col + PATCH] = 255
    return images


def patch_corner(label: int, size: int = 32) -> tuple[int, int]:
    spots = [(r, c) for r in (0, 12, 24) for c in (0, 12, 24)] + [(12, 4)]
    row, col = spots[label % len(spots)]
    return min(row, size - PATCH), min(col, size - PATCH)


def write_cifar_pickles(
    root: str,
    n_train: int = 300,
    n_test: int = 100,
    seed: int = 0,
    make_images=planted_images,
    classes: int = 10,
) -> str:
    """CIFAR-10 python layout: root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}, with
    the first `classes` of CIFAR-10's classes."""
    planted_images = make_images
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    train_labels = np.arange(n_train) % classes
    rng.shuffle(train_labels)
    train = planted_images(train_labels, rng)
    for b, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        with open(os.path.join(folder, f"data_batch_{b}"), "wb") as f:
            pickle.dump(
                {
                    "data": train[part].reshape(len(part), -1),
                    "labels": train_labels[part].tolist(),
                    "batch_label": f"training batch {b} of 5",
                },
                f,
            )
    test_labels = np.arange(n_test) % classes
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(
            {"data": planted_images(test_labels, rng).reshape(n_test, -1), "labels": test_labels.tolist()}, f
        )
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(
            {"label_names": CLASSES[:classes], "num_cases_per_batch": n_train // 5, "num_vis": 3072}, f
        )
    return root


def write_image_folder(
    root: str,
    classes: list[str] = ("cat", "dog", "frog"),
    per_class: int = 40,
    per_class_test: int = 12,
    seed: int = 0,
    ext: str = "png",
) -> str:
    """ImageFolder layout: root/{train,test}/<class>/<n>.<ext>."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", per_class_test)):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            images = planted_images(np.full(count, c), rng)
            for i, image in enumerate(images):
                Image.fromarray(image.transpose(1, 2, 0)).save(
                    os.path.join(root, split, name, f"{i:04d}.{ext}")
                )
    return root


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    return write_cifar_pickles(str(tmp_path_factory.mktemp("cifar")))


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory) -> str:
    return write_image_folder(str(tmp_path_factory.mktemp("imagefolder")))


def child_env(**extra: str) -> dict:
    """The environment of a child process: this one's, with the repository first on PYTHONPATH (the rest
    kept, so a ``sitecustomize`` there, as in .ci/without_bf16, reaches every process)."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_script(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts in a new process, as a user would; return the finished process."""
    env = child_env(OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def run_here(script: str, *args: str) -> str:
    """Run a script in this process (no interpreter start-up, torch already imported); return what it
    printed. A UserError propagates as an exception."""
    saved_argv, saved_hook = sys.argv, sys.excepthook
    sys.argv = [script, *args]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv, sys.excepthook = saved_argv, saved_hook
        release_memory()
    return out.getvalue()


def release_memory() -> None:
    """Free what the last script left: its functions' cycles hold its tensors until a full collection, and
    glibc keeps freed blocks in its arenas (one per thread) unless trimmed, so the suite's resident memory
    would only ever grow."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def write_mnist(
    root: str, n_train: int = 200, n_test: int = 60, seed: int = 0, compress: bool = False
) -> str:
    """torchvision's raw layout: root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte. Each digit d is
    a bright bar at a height that depends on d, on a black 28x28 background."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        digits = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(digits)
        images = rng.integers(0, 30, size=(n, 28, 28), dtype=np.uint8)
        for i, d in enumerate(digits):
            images[i, 2 + 2 * d : 5 + 2 * d, 6:22] = 255
        opener = gzip.open if compress else open
        ext = ".gz" if compress else ""
        with opener(os.path.join(raw, f"{prefix}-images-idx3-ubyte{ext}"), "wb") as f:
            f.write(
                (2051).to_bytes(4, "big")
                + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
                + images.tobytes()
            )
        with opener(os.path.join(raw, f"{prefix}-labels-idx1-ubyte{ext}"), "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + digits.tobytes())
    return root


def write_waterbirds(root: str, per_group: tuple = (12, 2, 2, 12), seed: int = 0, size: int = 40) -> str:
    """group_DRO's layout: root/metadata.csv and species folders of JPEG files. A waterbird is a bright square
    top left; a water background is blue. per_group counts the training images of the groups (landbird on
    land, landbird on water, waterbird on land, waterbird on water); validation and test have 4 per group."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, index = [], 0
    for split, counts in ((0, per_group), (1, (4, 4, 4, 4)), (2, (4, 4, 4, 4))):
        for (y, place), count in zip(((0, 0), (0, 1), (1, 0), (1, 1)), counts):
            for _ in range(count):
                index += 1
                folder = f"{index % 3 + 1:03d}.{'Gull' if y else 'Sparrow'}"
                os.makedirs(os.path.join(root, folder), exist_ok=True)
                pixels = rng.integers(0, 60, size=(size, size + 8, 3), dtype=np.uint8)
                pixels[..., 2] += 120 if place else 0
                if y:
                    pixels[4:16, 4:16] = 255
                name = f"{folder}/bird_{index:04d}.jpg"
                Image.fromarray(pixels).save(os.path.join(root, name), quality=95)
                rows.append(f"{index},{name},{y},{split},{place},place_{index}.jpg")
    with open(os.path.join(root, "metadata.csv"), "w") as f:
        f.write("img_id,img_filename,y,split,place,place_filename\n" + "\n".join(rows) + "\n")
    return root


CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()


def write_celeba(
    root: str, layout: str = "kaggle", n: int = 60, seed: int = 0, size: tuple[int, int] = (48, 40)
) -> str:
    """A small CelebA: noise JPEGs (``size``: height, width; the real images are 218 x 178) where
    Blond_Hair = 1 puts a bright square, 0.4 of the width wide, top left.

    layout "kaggle": list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/img_align_celeba/*.jpg
    layout "torchvision": celeba/list_attr_celeba.txt, celeba/list_eval_partition.txt,
    celeba/img_align_celeba/
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    blond = CELEBA_ATTRIBUTES.index("Blond_Hair")
    values[:, blond] = np.where(np.arange(n) % 2 == 0, 1, -1)
    partition = np.array([0] * (n * 2 // 3) + [1] * (n // 6) + [2] * (n - n * 2 // 3 - n // 6))
    ids = [f"{i + 1:06d}.jpg" for i in range(n)]
    base = os.path.join(root, "celeba") if layout == "torchvision" else root
    images = (
        os.path.join(base, "img_align_celeba", "img_align_celeba")
        if layout == "kaggle"
        else os.path.join(base, "img_align_celeba")
    )
    os.makedirs(images, exist_ok=True)
    for i, image_id in enumerate(ids):
        pixels = rng.integers(0, 80, size=(*size, 3), dtype=np.uint8)
        if values[i, blond] == 1:
            side = size[1] // 10
            pixels[side : 5 * side, side : 5 * side] = 255
        Image.fromarray(pixels).save(os.path.join(images, image_id), quality=95)
    if layout == "kaggle":
        with open(os.path.join(base, "list_attr_celeba.csv"), "w") as f:
            f.write("image_id," + ",".join(CELEBA_ATTRIBUTES) + "\n")
            for image_id, row in zip(ids, values):
                f.write(image_id + "," + ",".join(map(str, row)) + "\n")
        with open(os.path.join(base, "list_eval_partition.csv"), "w") as f:
            f.write("image_id,partition\n" + "".join(f"{i},{p}\n" for i, p in zip(ids, partition)))
    else:
        with open(os.path.join(base, "list_attr_celeba.txt"), "w") as f:
            f.write(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + "\n")
            for image_id, row in zip(ids, values):
                f.write(image_id + " " + " ".join(f"{v:2d}" for v in row) + "\n")
        with open(os.path.join(base, "list_eval_partition.txt"), "w") as f:
            f.write("".join(f"{i} {p}\n" for i, p in zip(ids, partition)))
    return root
