"""Planted shortcuts: every kind stamped exactly as specified, the evaluation sets, and the paper's MNIST."""

import json

import numpy as np
import pytest
import torch

from conftest import run_here, write_cifar_pickles, write_mnist
from masktune.datasets import experiment_data
from masktune.images import ImageSet
from masktune.shortcuts import (
    GRAIN_AMPLITUDE,
    base_images,
    evaluation_sets,
    marker_coverage,
    marker_tiles,
    palette,
    plant,
    shape_patterns,
    stamp,
    training_markers,
)

CONFIG = {
    "shortcut": "square",
    "shortcut_ratio": 0.95,
    "shortcut_size": 4,
    "shortcut_position": "top_left",
    "shortcut_classes": "all",
}


def marked_region(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: the pixels stamping changed."""
    return (before != after).any(1)


def test_exact_fraction_per_class_and_reproducible():
    labels = torch.arange(10).repeat_interleave(40)
    a = training_markers(labels, 10, CONFIG, torch.Generator().manual_seed(0))
    b = training_markers(labels, 10, CONFIG, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for c in range(10):
        own = a[labels == c]
        assert (own == c).sum() == 38 and (
            (own != c) & (own >= 0)
        ).sum() == 2  # round(0.95 * 40), the rest: others
    first = training_markers(
        labels % 2,
        2,
        dict(CONFIG, shortcut_classes="first", shortcut_ratio=0.9),
        torch.Generator().manual_seed(0),
    )
    assert (first[labels % 2 == 0] == 0).sum() == 180 and (
        first[labels % 2 == 1] == 0
    ).sum() == 20  # 90% / 10%
    assert set(first.tolist()) == {-1, 0}


@pytest.mark.parametrize(
    "position, corner", [("top_left", (0, 0)), ("bottom_right", (28, 28)), ("top_right", (0, 28))]
)
def test_square_colour_and_place(position, corner):
    images = torch.full((3, 3, 32, 32), 7, dtype=torch.uint8)
    out = stamp(images, torch.tensor([2, -1, 0]), dict(CONFIG, shortcut_position=position), torch.Generator())
    row, col = corner
    assert (out[0, :, row : row + 4, col : col + 4] == palette(3)[2].view(3, 1, 1)).all()
    assert (out[2, :, row : row + 4, col : col + 4] == palette(3)[0].view(3, 1, 1)).all()
    assert torch.equal(out[1], images[1])  # -1: no marker
    assert marked_region(images, out).sum((1, 2)).tolist() == [16, 0, 16]  # nothing else touched
    assert palette(2)[0].tolist() == [255, 0, 0]  # class 0's colour is red (the paper's square)
    assert len({tuple(c.tolist()) for c in palette(10)}) == 10


def test_moving_square_lands_somewhere_new_in_each_image_reproducibly():
    images = torch.zeros(200, 3, 32, 32, dtype=torch.uint8)
    marker = torch.arange(200) % 10
    config = dict(CONFIG, shortcut="moving_square")
    out = stamp(images, marker, config, torch.Generator().manual_seed(1))
    assert torch.equal(out, stamp(images, marker, config, torch.Generator().manual_seed(1)))
    region = marked_region(images, out)
    assert (region.sum((1, 2)) == 16).all()  # a whole 4x4 square in every image
    rows = region.any(2).float().argmax(1)
    cols = region.any(1).float().argmax(1)
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 150  # 200 images, 841 possible places
    assert (out.permute(0, 2, 3, 1)[region] == palette(10)[marker].repeat_interleave(16, 0)).all()


def test_shape_markers_differ_by_shape_only():
    patterns = shape_patterns(10, 5)
    assert patterns.shape == (10, 5, 5) and (patterns.sum((1, 2)) == 12).all()  # the same amount of white
    assert len({tuple(p.flatten().tolist()) for p in patterns}) == 10
    tiles = marker_tiles("shape", 10, 5)
    assert set(tiles.unique().tolist()) == {0, 255} and torch.equal(
        tiles[:, 0], tiles[:, 2]
    )  # white on black
    images = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    out = stamp(
        images,
        torch.tensor([3, 7]),
        dict(CONFIG, shortcut="shape", shortcut_size=5, shortcut_position="bottom_left"),
        torch.Generator(),
    )
    assert torch.equal(out[:, :, 27:, :5], tiles[[3, 7]]) and torch.equal(out[:, :, :27], images[:, :, :27])


def test_a_large_square_is_the_same_kind_at_another_size():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    out = stamp(images, torch.tensor([1]), dict(CONFIG, shortcut_size=12), torch.Generator())
    assert marked_region(images, out)[0, :12, :12].all() and marked_region(images, out).sum() == 144


def test_marker_coverage_by_hand():
    """Three images: a 4x4 square fully masked, a quarter masked, and no marker (left out of both numbers)."""
    unmarked = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    images = unmarked.clone()
    images[:2, 0, :4, :4] = 200
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, :2, :2] = True
    masks[1, 6:, 6:] = True  # off the marker: not counted
    masks[2] = True
    planted = ImageSet(images, torch.zeros(3, dtype=torch.long), ["a"], unmarked=unmarked)
    assert marker_coverage(masks, planted) == {"mean": pytest.approx((1 + 0.25) / 2), "at_least_half": 0.5}


def test_evaluation_sets_from_unmarked_images(cifar_dir):
    train, val, test = experiment_data(
        {"data_dir": cifar_dir, "seed": 0, "val_fraction": 0.1, **CONFIG, "shortcut_ratio": 0.9}
    )
    assert val.unmarked is not None and not torch.equal(val.unmarked, val.images)  # planted in validation too
    assert torch.cat(
        [train.spurious == train.labels, val.spurious == val.labels]
    ).float().mean() == pytest.approx(0.9, abs=0.02)
    sets = evaluation_sets(test, CONFIG, torch.Generator().manual_seed(1000))
    assert torch.equal(sets["clean"].images, test.images) and (sets["clean"].spurious == -1).all()
    assert torch.equal(sets["aligned"].spurious, test.labels)
    assert (sets["conflicting"].spurious != test.labels).all()
    for name in ("aligned", "conflicting"):
        assert (sets[name].images[:, :, :4, :4] == palette(10)[sets[name].spurious].view(-1, 3, 1, 1)).all()
    assert (
        sets["conflicting"].groups()[0] == f"{test.classes[test.labels[0]]}, marker "
        f"{test.classes[sets['conflicting'].spurious[0]]}"
    )


def test_the_papers_mnist_test_sets(tmp_path):
    root = write_mnist(str(tmp_path), n_train=200, n_test=60)
    config = {
        "data_dir": root,
        "dataset": "mnist",
        "seed": 0,
        "val_fraction": 0.1,
        **CONFIG,
        "shortcut_classes": "first",
        "shortcut_ratio": 0.99,
    }
    train, _, test = experiment_data(config)
    zero, one = train.labels == 0, train.labels == 1
    assert (train.spurious[zero] == 0).sum() == round(0.99 * zero.sum().item())
    assert (train.spurious[one] == 0).sum() == round(0.01 * one.sum().item())
    red = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    assert (train.images[train.spurious == 0][:, :, :4, :4] == red).all()
    sets = evaluation_sets(test, config, torch.Generator().manual_seed(1000))
    biased = sets[
        "conflicting"
    ]  # the paper's biased test: the square on every class-1 image, none on class 0
    has_square = (biased.images[:, :, :4, :4] == red).flatten(1).all(1)
    assert torch.equal(has_square, test.labels == 1) and torch.equal(sets["clean"].images, test.images)
    assert torch.equal((sets["aligned"].images[:, :, :4, :4] == red).flatten(1).all(1), test.labels == 0)
    assert set(biased.groups()) == {"0-4, none", "5-9, marker"}


def test_plant_keeps_the_unmarked_images(cifar_dir):
    train, _, _ = experiment_data({"data_dir": cifar_dir, "seed": 0, "val_fraction": 0.1})
    planted = plant(train, CONFIG, torch.Generator().manual_seed(5))
    assert torch.equal(planted.unmarked, train.images) and not torch.equal(planted.images, train.images)
    assert torch.equal(
        planted.images, plant(train, CONFIG, torch.Generator().manual_seed(5)).images
    )  # reproducible for a seed


def grey_noise(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Images with no class information at all; mid-grey noise, so that every marker colour stands out."""
    return rng.integers(64, 192, size=(len(labels), 3, size, size), dtype=np.uint8)


def tinted_grey_noise(labels: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Grey noise with a weak class signal, which ERM ignores for a marker: class 1's blue channel is 32
    levels brighter (at 24 the fine-tune learns it only in part, from 48 ERM and the random control too)."""
    images = grey_noise(labels, rng, size)
    images[labels == 1, 2] += 32
    return images


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, size, classes, n_train, marked, epochs, make_images",
    [
        ("square", 8, 10, 400, "all", 3, grey_noise),
        # with 200 images, the random control lost the moving square on an fp32 EPYC
        ("moving_square", 6, 2, 400, "all", 3, grey_noise),
        ("shape", 6, 2, 200, "all", 3, grey_noise),
        ("square", 4, 2, 200, "first", 3, grey_noise),
        # 14% of the image: after 3 epochs ERM's logits on it are so large that swapping it in makes the
        # fine-tune's loss diverge. Its masks hide it whole, so on pure noise the fine-tune's loss is flat
        # (ln 2) whichever way the prediction leans: the tint gives it something to learn instead
        ("square", 12, 2, 200, "all", 2, tinted_grey_noise),
    ],
    ids=["square", "moving_square", "shape", "one_class_square", "large_square"],
)
def test_the_default_masktune_stops_following_a_planted_marker(
    tmp_path, kind, size, classes, n_train, marked, epochs, make_images
):
    """On noise images a class's marker (on every training image; ``first``: class 0's marker on class 0
    only, as in the paper's MNIST) is the only signal. ERM follows it; the default masks hide a good part
    of it, at its own size; MaskTune with the default saliency, extent, fill and learning rate stops
    following it. A control run with the masks moved to random places does not: the masks are what removes
    it. On noise the fine-tune has little else to learn, so the check is the marker's pull on the
    prediction (aligned minus conflicting accuracy), in fp32 on any CPU."""
    data = write_cifar_pickles(str(tmp_path / "data"), n_train, make_images=make_images, classes=classes)
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={tmp_path}",
        f"--out_dir={tmp_path}",
        f"--num_epochs={epochs}",
        "--batch_size=16",
        "--val_fraction=0.1",
        f"--shortcut={kind}",
        f"--shortcut_classes={marked}",
        "--shortcut_ratio=1.0",
        f"--shortcut_size={size}",
        "--augment=False",
        "--amp=False",
        "--eval_batch_size=200",
        "--finetune_epochs=1",  # the length of the fine-tune these outcomes were set on
        "--finetune_min_steps=30",
    ]
    run_here("vgg.py", *args)
    run_here("evaluate_vgg.py", *args)
    models = json.load(open(tmp_path / "metrics.json"))["models"]

    def reliance(model: str) -> float:  # how far the marker moves the prediction: 1 follows it, 0 ignores it
        return models[model]["aligned_accuracy"] - models[model]["conflicting_accuracy"]

    assert reliance("ERM") > 0.8  # ERM follows the marker
    assert reliance("MaskTune") < reliance("ERM") - 0.25  # MaskTune much less
    assert reliance("random-mask control") > reliance("MaskTune") + 0.2  # the masks' place is what does it
    coverage = json.load(open(tmp_path / "summary.json"))["marker_coverage"]
    # a good part of the marker: at its own area the smallest mask (3% of the image) is less than a 6x6
    # marker (3.5%), and the smoothed map spreads it (the moving square's masks: 43% of it on average)
    assert coverage["mean"] > 0.3


@pytest.mark.slow
def test_the_default_masks_hide_a_good_part_of_a_frame(tmp_path):
    """A frame 3 pixels wide (34% of the image) is larger than any top region: each image's mask hides a
    part of it and the class's consensus adds more. Whether the fine-tune then stops following the frame is
    not held here: on this tiny data it relearns the part left in view on some seeds and thread counts
    (reliance 0.0 to 1.0 over seeds 0-2, 1 or 2 threads), as on CIFAR-10's frame (RESULTS.md)."""
    data = write_cifar_pickles(str(tmp_path / "data"), 200, make_images=tinted_grey_noise, classes=2)
    args = [f"--data_dir={data}", f"--checkpoint_dir={tmp_path}", f"--out_dir={tmp_path}", "--num_epochs=3"]
    args += ["--batch_size=16", "--shortcut=frame", "--shortcut_size=3", "--shortcut_ratio=1.0"]
    args += ["--augment=False", "--amp=False", "--controls=False"]
    args += ["--finetune_epochs=1", "--finetune_min_steps=1"]
    out = run_here("vgg.py", *args)
    every_image = "a region decides the prediction on 100.0-100.0% of a class's training images"
    assert every_image in out  # ERM's prediction follows a region of each image: the frame, on noise
    # seed 0 hides 72% of it, on 1 thread or 2; seeds 1 and 2: 45-46% and 91-94%
    assert json.load(open(tmp_path / "summary.json"))["marker_coverage"]["mean"] > 0.4


@pytest.mark.slow
def test_the_mnist_recipe_end_to_end(tmp_path):
    root = write_mnist(str(tmp_path / "data"), n_train=200, n_test=60)
    args = [
        "config/mnist_paper.py",
        f"--data_dir={root}",
        f"--checkpoint_dir={tmp_path}",
        f"--out_dir={tmp_path}",
        "--num_epochs=2",
        "--finetune_epochs=1",
        "--finetune_min_steps=0",
        "--controls=False",
    ]
    run_here("vgg.py", *args)
    run_here("evaluate_vgg.py", *args)
    tuned = json.load(open(tmp_path / "metrics.json"))["models"]["MaskTune"]
    assert set(tuned["groups"]["per_group"]) == {"0-4, none", "5-9, none", "0-4, marker", "5-9, marker"}
    assert 0 <= tuned["worst_group_accuracy"] <= tuned["conflicting_accuracy"] <= 1


def test_a_frame_is_a_class_texture_on_the_border_only():
    images = torch.full((3, 3, 32, 32), 100, dtype=torch.uint8)
    config = dict(CONFIG, shortcut="frame", shortcut_size=3)
    out = stamp(images, torch.tensor([0, 1, -1]), config, torch.Generator())
    region = marked_region(images, out)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[3:29, 3:29] = False  # 32 * 32 - 26 * 26 = 348 border pixels
    assert set(out[:2].unique().tolist()) == {0, 100, 255} and torch.equal(out[2], images[2])
    assert not region[:2, ~border].any() and (out[:2, :, border] != 100).all()  # only the border, all of it
    assert not torch.equal(out[0], out[1])  # one texture per class
    texture = out[0, 0][border]
    assert 0.3 < (texture == 255).float().mean() < 0.7  # a texture of both colours, not a colour


def test_grain_moves_every_pixel_up_or_down_in_a_fixed_pattern_per_class():
    images = torch.full((4, 3, 16, 16), 100, dtype=torch.uint8)
    images[3] = 250  # near white: the grain is clipped there, not wrapped around
    out = stamp(images, torch.tensor([0, 0, 1, 1]), dict(CONFIG, shortcut="grain"), torch.Generator())
    change = out.int() - images.int()
    assert set(change[:3].unique().tolist()) == {-GRAIN_AMPLITUDE, GRAIN_AMPLITUDE}  # every pixel, both ways
    assert torch.equal(change[0], change[1]) and not torch.equal(change[1], change[2])  # one per class
    assert torch.equal(change[:, 0], change[:, 2])  # the same in every channel: grey, not colour
    assert out[3].max() == 255 and torch.equal(change[3][change[2] < 0], change[2][change[2] < 0])
    unmarked = stamp(
        images, torch.tensor([-1, -1, -1, -1]), dict(CONFIG, shortcut="grain"), torch.Generator()
    )
    assert torch.equal(unmarked, images)


def test_a_colour_cast_moves_every_pixel_a_quarter_towards_the_class_colour():
    images = torch.tensor([0, 200], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4).clone()
    out = stamp(images, torch.tensor([0, -1]), dict(CONFIG, shortcut="colour_cast"), torch.Generator())
    # class 0's colour is red (255, 0, 0): 0.75 * 0 + 0.25 * 255 = 63.75 -> 64 in red, 0 elsewhere
    assert out[0, :, 0, 0].tolist() == [64, 0, 0] and (out[0] == out[0, :, :1, :1]).all()
    assert torch.equal(out[1], images[1])


def test_a_scene_shows_the_shrunk_object_on_another_photo_of_the_marker_class():
    # four 8x8 images: classes 0, 0, 1, 1, each a flat grey level of its own
    flat = torch.tensor([10, 20, 200, 220], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    labels = torch.tensor([0, 0, 1, 1])
    config = dict(CONFIG, shortcut="scene", shortcut_size=4)
    base = base_images(flat, config)
    assert (base[:, :, 2:6, 2:6] == flat[:, :, :4, :4]).all()  # the object, shrunk, in the centre
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[2:6, 2:6] = True
    assert (base[:, :, ~inside] == 128).all()  # on grey
    out = stamp(base, torch.tensor([1, 0, 1, -1]), config, torch.Generator().manual_seed(0), labels)
    assert torch.equal(out[:, :, inside], base[:, :, inside])  # the object untouched
    assert set(out[0, 0][~inside].unique().tolist()) <= {200, 220}  # a class-1 photo around a class-0 object
    assert set(out[1, 0][~inside].unique().tolist()) <= {10, 20}
    assert torch.equal(out[3], base[3])  # no marker: the grey background
