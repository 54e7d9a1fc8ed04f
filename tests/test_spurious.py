"""The spurious-patch benchmark: patch placement, test sets, and a shortcut that ERM learns and masks hide."""
import json
import os

import pytest
import torch

from checkpoint import load_checkpoint, load_weights
from conftest import noise_images, run_script, write_cifar_pickles
from data import (experiment_data, patch_palette, spurious_test_sets, spurious_training_classes,
                  stamp_patches)
from masking import compute_masks
from models import VGG_MEAN, VGG_STD, VGGWithAttention


def test_exact_fraction_per_class_and_reproducible():
    labels = torch.arange(10).repeat_interleave(40)
    a = spurious_training_classes(labels, 10, 0.95, "other", torch.Generator().manual_seed(0))
    b = spurious_training_classes(labels, 10, 0.95, "other", torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    for c in range(10):
        own = a[labels == c]
        assert (own == c).sum() == 38  # round(0.95 * 40)
        assert ((own != c) & (own >= 0)).sum() == 2  # the rest: another class's colour
    none = spurious_training_classes(labels, 10, 0.5, "none", torch.Generator().manual_seed(0))
    assert ((none == labels).sum(), (none == -1).sum()) == (200, 200)


def test_patch_colour_and_place():
    images = torch.full((3, 3, 32, 32), 7, dtype=torch.uint8)
    out = stamp_patches(images, torch.tensor([2, -1, 0]), 4, "bottom_right")
    palette = patch_palette(3)
    assert (out[0, :, 28:, 28:] == palette[2].view(3, 1, 1)).all()
    assert (out[2, :, 28:, 28:] == palette[0].view(3, 1, 1)).all()
    assert torch.equal(out[1], images[1])  # -1: no patch
    assert (out[:, :, :28, :] == 7).all() and (out[:, :, :, :28] == 7).all()  # nothing else touched
    assert len({tuple(c.tolist()) for c in patch_palette(10)}) == 10


def test_test_sets(cifar_dir):
    config = {"data_dir": cifar_dir, "seed": 0, "val_size": 30, "spurious_ratio": 0.9,
              "spurious_conflicting": "other", "spurious_patch_size": 4, "spurious_position": "top_left"}
    train, val, test = experiment_data(config)
    sets = spurious_test_sets(test, config)
    assert torch.equal(sets["clean"].images, test.images) and (sets["clean"].patch_class == -1).all()
    assert torch.equal(sets["aligned"].patch_class, test.labels)
    assert (sets["conflicting"].patch_class != test.labels).all()
    palette = patch_palette(10)
    for name in ("aligned", "conflicting"):
        assert (sets[name].images[:, :, :4, :4] == palette[sets[name].patch_class].view(-1, 3, 1, 1)).all()
    everything = torch.cat([train.patch_class == train.labels, val.patch_class == val.labels])
    assert everything.float().mean() == pytest.approx(0.9, abs=0.01)


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    """Pure-noise images whose only signal is an 8x8 class-coloured patch on every training image."""
    root = tmp_path_factory.mktemp("shortcut")
    data = write_cifar_pickles(str(root / "data"), n_train=600, n_test=200, make_images=noise_images)
    ckpt, out = str(root / "ckpt"), str(root / "out")
    run_script("vgg.py", f"--data_dir={data}", f"--checkpoint_dir={ckpt}", f"--out_dir={out}", "--num_epochs=4",
               "--batch_size=32", "--val_size=60", "--spurious_ratio=1.0", "--spurious_patch_size=8",
               "--augment=False", "--eval_batch_size=200", "--controls=False", "--mask_fill=shuffle",
               "--finetune_learning_rate=0.01")
    run_script("evaluate_vgg.py", f"--checkpoint_dir={ckpt}", f"--out_dir={out}/eval")
    return {"data": data, "ckpt": ckpt, "out": out}


def test_erm_learns_the_shortcut_and_groups_are_reported(shortcut_run):
    metrics = json.load(open(os.path.join(shortcut_run["out"], "eval", "metrics.json")))
    erm = metrics["models"]["ERM"]["spurious"]
    assert erm["aligned_accuracy"] > 0.9 and erm["conflicting_accuracy"] < 0.2
    assert erm["worst_group_accuracy"] <= erm["conflicting_accuracy"]
    groups = metrics["models"]["ERM"]["groups"]
    assert sum(groups["group_count"].values()) == 2 * 200  # aligned and conflicting test images
    assert all(f"class={c},patch={c}" in groups["per_group"] for c in ("airplane", "truck"))
    assert len(groups["per_group"]) <= 100  # at most 10 aligned + 90 conflicting (class, colour) groups
    rows = open(os.path.join(shortcut_run["out"], "eval", "predictions.csv")).read().splitlines()
    assert rows[0].startswith("test_set,index,path,label,patch_class") and len(rows) == 1 + 3 * 200
    assert os.path.getsize(os.path.join(shortcut_run["out"], "eval", "conflicting_heatmaps.png")) > 1000


def test_shuffle_filled_masks_unlearn_the_shortcut(shortcut_run):
    """Fine-tuning on images whose masked region (mostly the patch) is filled from random other images shows
    the patch colours at random with respect to the labels: the model stops following them."""
    models = json.load(open(os.path.join(shortcut_run["out"], "eval", "metrics.json")))["models"]
    erm, masktune = models["ERM"]["spurious"], models["MaskTune"]["spurious"]
    assert masktune["aligned_accuracy"] < erm["aligned_accuracy"] - 0.3  # the only signal here is the patch


@pytest.mark.parametrize("strategy", ["attention", "xgradcam"])
def test_erm_masks_cover_the_patch(shortcut_run, strategy):
    """Most training images get at least half of the patch hidden (about 70% of images with either strategy
    after this short training; masks placed at random would almost never hide half of the patch)."""
    state = load_checkpoint(os.path.join(shortcut_run["ckpt"], "vgg_initial.pt"))
    model = load_weights(VGGWithAttention(10), state)
    train, _, _ = experiment_data(state["config"])
    masks = compute_masks(model, train.images, strategy, batch_size=200, device=torch.device("cpu"),
                          mean=VGG_MEAN, std=VGG_STD)
    on_patch = masks[:, :8, :8].flatten(1).float().mean(1)   # fraction of the patch hidden
    assert (on_patch > 0.5).float().mean() > 0.6
