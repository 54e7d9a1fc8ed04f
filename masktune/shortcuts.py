"""Planted shortcuts: a feature tied to the class on most training images, to measure whether a model follows
it and whether MaskTune removes it.

Kinds (``shortcut``); ``shortcut_size`` is the marker's side, the frame's width or the object's side:
  square         a solid square in a fixed corner (``shortcut_position``), coloured by class
  moving_square  the same square at a random place in every image
  shape          a pattern of white pixels on a black tile in a fixed corner, one pattern per class: the
                 class is carried by shape, not colour
  frame          a border ``shortcut_size`` pixels wide of a black-and-white texture, one per class: large
                 and thin, spread over the whole edge
  scene          Waterbirds-like: every image shrunk to ``shortcut_size`` pixels and shown in the centre of a
                 scene: the surroundings of another real photo of the marker's class, at half resolution
                 (``base_images`` shrinks the objects; the clean images show them on plain grey)
  grain          every pixel brightened or darkened by ``GRAIN_AMPLITUDE`` in a fixed pattern, one per
                 class, as a camera's sensor leaves its own noise on every photo: not local, so no mask can
                 remove it (the development kind of a whole-image shortcut)
  colour_cast    the whole image tinted towards the class's colour (``CAST_STRENGTH``): not local, so no mask
                 can remove it
Which images carry which marker (``shortcut_classes``):
  all    every image carries a marker: its own class's on ``shortcut_ratio`` of each class's images,
         another class's on the rest (the CIFAR-10 benchmarks)
  first  one marker, class 0's: on ``shortcut_ratio`` of the class-0 images and on 1 - ratio of the
         others, none elsewhere (the MaskTune paper's biased MNIST: a red square, ratio 0.99)
Evaluation sets are built from unmarked images: ``clean`` (no marker), ``aligned`` (the training
association at its extreme) and ``conflicting`` (``all``: another class's marker on every image; ``first``:
the marker on every image except class 0's, the paper's "biased" test). Groups are (class, marker).
"""

import colorsys
from dataclasses import replace

import torch
import torch.nn.functional as F

from masktune.console import check, check_choice
from masktune.images import ImageSet
from masktune.metrics import shortcut_metrics
from masktune.seeds import stream

KINDS = ("square", "moving_square", "shape", "frame", "scene", "grain", "colour_cast")
WHOLE_IMAGE_KINDS = KINDS[3:]  # drawn over the whole image; the first three are tiles (``marker_tiles``)
POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right")
TEXTURE_TILE = 4  # side of the tile a frame's texture repeats
GRAIN_AMPLITUDE = 16  # grain: each pixel moves this far (of 255) up or down, in every channel
CAST_STRENGTH = 0.25  # colour_cast: each pixel moves this far towards the class's colour
SCENE_GREY = 128  # scene: the background of the clean images


def palette(num_classes: int) -> torch.Tensor:
    """One saturated colour per class, hues evenly spaced from red: uint8 (C, 3)."""
    return torch.tensor(
        [
            [round(255 * v) for v in colorsys.hsv_to_rgb(c / num_classes, 1.0, 1.0)]
            for c in range(num_classes)
        ],
        dtype=torch.uint8,
    )


def shape_patterns(num_classes: int, size: int) -> torch.Tensor:
    """One pattern per class: bool (C, size, size), each with the same number of pixels on (half of them,
    rounded down), drawn once from a fixed seed, so only the arrangement tells the classes apart."""
    check(size >= 3, "a shape marker needs shortcut_size >= 3")
    generator = torch.Generator().manual_seed(12345)
    patterns = torch.zeros(num_classes, size * size, dtype=torch.bool)
    for c in range(num_classes):
        patterns[c, torch.randperm(size * size, generator=generator)[: size * size // 2]] = True
    return patterns.view(num_classes, size, size)


def marker_tiles(kind: str, num_markers: int, size: int) -> torch.Tensor:
    """The pixels of each local marker (square, moving_square, shape): uint8 (M, 3, size, size)."""
    check_choice("shortcut", kind, KINDS[:3])
    if kind == "shape":
        return (shape_patterns(num_markers, size).to(torch.uint8) * 255)[:, None].expand(-1, 3, -1, -1)
    return palette(num_markers)[:, :, None, None].expand(-1, -1, size, size)


def frame_region(height: int, width: int, size: int) -> torch.Tensor:
    """bool (H, W): the pixels within ``size`` of the image's edge."""
    rows, cols = torch.arange(height), torch.arange(width)
    inside_rows = (rows >= size) & (rows < height - size)
    inside_cols = (cols >= size) & (cols < width - size)
    return ~(inside_rows[:, None] & inside_cols[None, :])


def frame_textures(num_markers: int, height: int, width: int) -> torch.Tensor:
    """Each class's texture over a whole image: a tile of ``shape_patterns`` repeated, white on black, uint8
    (M, 3, H, W)."""
    tiles = shape_patterns(num_markers, TEXTURE_TILE).to(torch.uint8) * 255
    reps = (-(-height // TEXTURE_TILE), -(-width // TEXTURE_TILE))
    return tiles.repeat(1, *reps)[:, None, :height, :width].expand(-1, 3, -1, -1)


def grain_patterns(num_markers: int, height: int, width: int) -> torch.Tensor:
    """Each class's grain: +-``GRAIN_AMPLITUDE`` at random per pixel, the same in every channel, drawn once
    from a fixed seed: int16 (M, 1, H, W)."""
    generator = torch.Generator().manual_seed(54321)
    signs = torch.randint(0, 2, (num_markers, 1, height, width), generator=generator) * 2 - 1
    return (signs * GRAIN_AMPLITUDE).to(torch.int16)


def object_box(height: int, width: int, size: int) -> tuple[slice, slice]:
    """scene: where the shrunk object sits (the centre)."""
    top, left = (height - size) // 2, (width - size) // 2
    return slice(top, top + size), slice(left, left + size)


def base_images(images: torch.Tensor, config: dict) -> torch.Tensor:
    """The images a kind stamps on: for ``scene`` each image shrunk to ``shortcut_size`` (antialiased) in the
    centre of a grey one; for every other kind the images themselves."""
    if config["shortcut"] != "scene":
        return images
    n, channels, height, width = images.shape
    size = config["shortcut_size"]
    check(
        0 < size < min(height, width), f"a scene needs shortcut_size between 1 and {min(height, width) - 1}"
    )
    small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True)
    out = torch.full_like(images, SCENE_GREY)
    out[(slice(None), slice(None), *object_box(height, width, size))] = small.round().clamp(0, 255).byte()
    return out


def scene_backgrounds(
    images: torch.Tensor, labels: torch.Tensor, marker: torch.Tensor, size: int, generator: torch.Generator
) -> torch.Tensor:
    """For each image with a marker t, the object of a random other image of class t (of ``images``, already
    shrunk by ``base_images``) enlarged to the whole image: that photo's surroundings at half resolution."""
    height, width = images.shape[-2:]
    source = torch.zeros(len(images), dtype=torch.long)
    for t in marker.unique().tolist():
        wanted = (marker == t).nonzero().flatten()
        pool = (labels == t).nonzero().flatten()
        check(t < 0 or len(pool) > 0, f"a scene of class {t} needs images of that class in the set")
        if t >= 0:
            source[wanted] = pool[torch.randint(len(pool), (len(wanted),), generator=generator)]
    objects = images[(source, slice(None), *object_box(height, width, size))].float()
    return F.interpolate(objects, size=(height, width), mode="bilinear").round().clamp(0, 255).byte()


def stamp(
    images: torch.Tensor,
    marker: torch.Tensor,
    config: dict,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """A copy of the (CPU) ``images`` (of ``base_images``) with marker ``marker[i]`` on image i (none where
    -1), placed as the kind says; ``generator`` draws the places of a moving marker and the photos a scene
    comes from (the images whose ``labels`` equal the marker)."""
    kind, size, position = config["shortcut"], config["shortcut_size"], config["shortcut_position"]
    check_choice("shortcut", kind, KINDS)
    check_choice("shortcut_position", position, POSITIONS)
    n, _, height, width = images.shape
    check(0 < size <= min(height, width), f"shortcut_size must be between 1 and {min(height, width)}")
    on = (marker >= 0).nonzero().flatten()
    out = images.clone()
    num_markers = max(int(marker.max()) + 1, 1)
    if kind in WHOLE_IMAGE_KINDS:  # composed over every marked image
        if kind == "frame":
            check(2 * size < min(height, width), "a frame needs 2 * shortcut_size below the image side")
            where = frame_region(height, width, size)
            marked = torch.where(where, frame_textures(num_markers, height, width)[marker[on]], images[on])
        elif kind == "scene":
            check(labels is not None, "a scene is made from images of the marker's class: pass labels")
            backgrounds = scene_backgrounds(images, labels, marker, size, generator)[on]
            inside = torch.zeros(height, width, dtype=torch.bool)
            inside[object_box(height, width, size)] = True
            marked = torch.where(inside, images[on], backgrounds)
        elif kind == "grain":
            grain = grain_patterns(num_markers, height, width)[marker[on]]
            marked = (images[on].to(torch.int16) + grain).clamp(0, 255).byte()
        else:
            colour = palette(num_markers)[marker[on]].float()[:, :, None, None]
            blend = (1 - CAST_STRENGTH) * images[on].float() + CAST_STRENGTH * colour
            marked = blend.round().clamp(0, 255).byte()
        out[on] = marked
        return out
    if kind == "moving_square":
        top = torch.randint(0, height - size + 1, (n,), generator=generator)
        left = torch.randint(0, width - size + 1, (n,), generator=generator)
    else:
        top = torch.full((n,), 0 if position.startswith("top") else height - size)
        left = torch.full((n,), 0 if position.endswith("left") else width - size)
    tiles = marker_tiles(kind, num_markers, size)
    rows = top[on, None] + torch.arange(size)  # (K, size)
    cols = left[on, None] + torch.arange(size)  # (K, size)
    out.permute(0, 2, 3, 1)[on[:, None, None], rows[:, :, None], cols[:, None, :]] = tiles[
        marker[on]
    ].permute(0, 2, 3, 1)
    return out


def training_markers(
    labels: torch.Tensor, num_classes: int, config: dict, generator: torch.Generator
) -> torch.Tensor:
    """Which marker each training image carries (-1: none): exactly round(ratio * n) images of each class
    carry their class's marker (``first``: class 0's marker on round((1 - ratio) * n) images of each other
    class); the rest carry another class's marker (``all``) or none (``first``)."""
    mode, ratio = config["shortcut_classes"], config["shortcut_ratio"]
    check_choice("shortcut_classes", mode, ("all", "first"))
    check(0 <= ratio <= 1, "shortcut_ratio must be in [0, 1]")
    marker = torch.full_like(labels, -1)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        if mode == "first":
            marked = round((ratio if c == 0 else 1 - ratio) * len(members))
            marker[members[:marked]] = 0
            continue
        aligned = round(ratio * len(members))
        marker[members[:aligned]] = c
        rest = members[aligned:]
        marker[rest] = (c + torch.randint(1, num_classes, (len(rest),), generator=generator)) % num_classes
    return marker


def marker_names(classes: list, mode: str) -> list[str]:
    return ["marker"] if mode == "first" else [f"marker {c}" for c in classes]


def plant(images: ImageSet, config: dict, generator: torch.Generator) -> ImageSet:
    """``images`` (of ``base_images``) with the shortcut planted as in training, drawn with ``generator``;
    the unmarked images are kept beside them."""
    marker = training_markers(images.labels, len(images.classes), config, generator)
    return replace(
        images,
        images=stamp(images.images, marker, config, generator, images.labels),
        spurious=marker,
        spurious_names=marker_names(images.classes, config["shortcut_classes"]),
        unmarked=images.images,
    )


def planted_pixels(images: ImageSet) -> torch.Tensor:
    """bool (N, H, W): the pixels the stamp changed; none on a set without a planted shortcut."""
    if images.unmarked is None:
        return torch.zeros(len(images.images), *images.images.shape[-2:], dtype=torch.bool)
    return (images.images != images.unmarked).any(1)


def marker_coverage(masks: torch.Tensor, images: ImageSet) -> dict:
    """How much of the planted marker ``masks`` (N, H, W) hide on the images of a planted set that carry one:
    the mean share of the marker's pixels masked, and the share of images with at least half of it masked."""
    marker = planted_pixels(images).to(masks.device)
    carries = marker.flatten(1).any(1)
    hidden = (masks.bool() & marker).flatten(1).sum(1)[carries] / marker.flatten(1).sum(1)[carries]
    return {"mean": hidden.mean().item(), "at_least_half": (hidden >= 0.5).float().mean().item()}


def describe_coverage(coverage: dict) -> str:
    """``marker_coverage``'s result as the line the scripts print."""
    return (
        f"masks hide {100 * coverage['mean']:.1f}% of the planted marker on average, at least half of it on "
        f"{100 * coverage['at_least_half']:.1f}% of the marked training images"
    )


def evaluation_sets(images: ImageSet, config: dict, generator: torch.Generator) -> dict[str, ImageSet]:
    """clean, aligned and conflicting versions of a set of unmarked images (of ``base_images``; see the
    module docstring)."""
    num_classes, labels = len(images.classes), images.labels
    if config["shortcut_classes"] == "first":
        aligned = torch.where(labels == 0, 0, -1)
        conflicting = torch.where(labels == 0, -1, 0)
    else:
        aligned = labels.clone()
        conflicting = (
            labels + torch.randint(1, num_classes, labels.shape, generator=generator)
        ) % num_classes
    names = marker_names(images.classes, config["shortcut_classes"])
    sets = {"clean": replace(images, spurious=torch.full_like(labels, -1), spurious_names=names)}
    for name, marker in (("aligned", aligned), ("conflicting", conflicting)):
        sets[name] = replace(
            images,
            images=stamp(images.images, marker, config, generator, labels),
            spurious=marker,
            spurious_names=names,
        )
    return sets


def shortcut_evaluation(logits_of, test_set: ImageSet, val_set: ImageSet, config: dict) -> tuple[dict, ...]:
    """Every model of a run on the clean, aligned and conflicting versions of its test and validation
    images (the validation metrics, ``val_...``, are the ones to tune on). ``logits_of(images)`` gives each
    model's logits by its run name. Returns each model's metrics, the test sets, and their logits
    (``logits[set][model]``)."""
    test_sets = evaluation_sets(test_set, config, stream(config["seed"], "test_sets"))
    val_sets = evaluation_sets(
        replace(val_set, images=val_set.unmarked), config, stream(config["seed"], "val_sets")
    )
    results, logits = {}, {}
    for sets, prefix in ((test_sets, ""), (val_sets, "val_")):
        logits[prefix] = {k: logits_of(s.images) for k, s in sets.items()}
        for name in logits[prefix]["clean"]:
            correct = {k: logits[prefix][k][name].argmax(1) == s.labels for k, s in sets.items()}
            results.setdefault(name, {}).update(shortcut_metrics(correct, sets, prefix))
    return results, test_sets, logits[""]
