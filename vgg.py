"""MaskTune with the report's VGGWithAttention on 32x32 images: CIFAR-10, MNIST, or any image folder tree.

  1. ERM training                  -> checkpoints/vgg_initial.pt (best validation epoch), vgg_last.pt
  2. masking the training set ONCE with the frozen best ERM model (saliency: `masking`; fill: `mask_fill`)
  3. fine-tuning the last ERM model and its optimizer state on the masked set -> checkpoints/vgg_finetuned.pt,
     and with `controls` the same fine-tune without masks and with the masks moved to random places
     -> vgg_nomask.pt, vgg_randommask.pt
Figures (why.png: what was masked and where the models look; training_curves.png) and summary.json go to
`out_dir`; evaluate_vgg.py and selective_classification_vgg.py then evaluate the run.

    python vgg.py                                  # CIFAR-10, downloaded into data/
    python vgg.py config/cifar_square.py --seed=1  # a recipe file, then overrides of any variable below
    python vgg.py config/cifar_square.py config/paper_protocol.py  # MaskTune as published, planted square
    python vgg.py --data_dir=/path/to/images       # train/<class>/*, test/<class>/* (val/<class>/* optional)
    python vgg.py --dry_run=True                   # a few hundred images, to check the set-up in seconds
    torchrun --nproc_per_node=2 vgg.py             # several GPUs or processes (DDP)
"""

import hashlib
import json
import os
import shutil
import time

import torch

from masktune.checkpoint import ensure_writable_dir, load_checkpoint, load_weights
from masktune.console import check, check_choice
from masktune.datasets import DATASETS, experiment_data
from masktune.device import pick_device, prepare_model, seed_everything
from masktune.distributed import init_distributed, is_main, world_size
from masktune.engine import (
    FINETUNE_SCHEDULES,
    accuracy,
    finetune_length,
    finetune_lr,
    predict,
    train,
    weights_sha1,
)
from masktune.masking import (
    FILLS,
    STRATEGIES,
    compute_masks,
    fill_masks,
    mask_settings,
    random_masks_like,
    saliency_map,
)
from masktune.plots import save_image_grid, save_training_curves
from masktune.recipes import configure
from masktune.shortcuts import evaluation_sets, marker_coverage
from models import VGGWithAttention

# data and output
data_dir = "data"  # CIFAR-10 (downloaded here if missing), MNIST/raw/, an image folder tree, Waterbirds
dataset = (
    "auto"  # auto: recognised in data_dir (CIFAR-10 if empty); or one of cifar10, mnist, folder, waterbirds
)
checkpoint_dir = "checkpoints"  # where the .pt files are written
out_dir = "out/vgg"  # figures and summary.json (the evaluation scripts write here too)
device = "auto"  # auto = cuda, then mps, then cpu
seed = 0  # seeds the validation split, initialisation, data order and augmentation
val_fraction = 0.1  # training images held out to pick the ERM epoch (where the data has no val split)
group_csv = ""  # image folders: group labels of validation and test images (columns: path, group)
group_column = "group"  # the group_csv column holding the group
cache_dir = ""  # e.g. data/cache: decoded image files kept as tensors for the next run
dry_run = False  # 512 training and 256 test images: checks the pipeline in seconds
# planted shortcut (see shortcuts.py): a marker tied to the class on most training images
shortcut = ""  # "" (none), "square", "moving_square", "shape", "frame", "scene" or "colour_cast"
shortcut_ratio = 0.95  # fraction of each class's training images carrying their own class's marker
shortcut_size = 4  # side of the marker, width of the frame, side of the shrunk object (scene)
shortcut_position = "top_left"  # where a fixed marker sits: top_left, top_right, bottom_left, bottom_right
shortcut_classes = "all"  # "all": a marker per class; "first": one marker, class 0's (the paper's MNIST)
# ERM training
batch_size = 128  # the report used 4; 128 reaches higher accuracy in a fraction of the time
num_epochs = 12  # ERM epochs
learning_rate = 0.02  # peak SGD learning rate (linear warm-up, then linear decay to 0)
warmup_epochs = 1.0  # epochs of linear learning-rate warm-up
momentum = 0.9  # SGD momentum (Nesterov)
weight_decay = 5e-4  # L2 penalty
augment = True  # random flips and 4-pixel crops (batched, on the device)
eval_batch_size = 1000  # batch size for evaluation and masking
# speed switches (rounding changes, the method does not)
amp = True  # bf16 autocast where native (CUDA, CPUs with AVX512-BF16/AMX), masking trunk included
channels_last = True  # NHWC memory format for the convolutions
compile_model = False  # torch.compile the model: compilation takes a while, pays off on long GPU runs
# MaskTune: masks computed once, with the frozen best ERM model
masking = "gradient"  # saliency: "gradient" (gradient x input), "attention" (the model's attention
# map) or "xgradcam" (the paper's); see masking.py
mask_extent = (
    "fixed"  # "decisive": per image, the smallest top region the prediction follows (see masking.py);
)
# "fixed": mask_quantile (gradient, attention) or mask_std (xgradcam)
mask_quantile = 0.97  # fixed extent, gradient, attention: pixels above this per-image quantile of the map
gradient_smoothing = 0.15  # gradient: box-filter side, as a fraction of the image side
mask_std = 2.0  # fixed extent, xgradcam: pixels above mean + mask_std * std of the positive CAM
mask_fill = "shuffle_union"  # "shuffle_union", "shuffle" or "swap": pixels of a random other image (see
# masking.py); "black" (the paper)
finetune_from = "last"  # the ERM epoch (and optimizer state) the fine-tune starts from: "last" or "best"
finetune_epochs = 1  # MaskTune fine-tunes for a single epoch (0: train the ERM model only)
finetune_learning_rate = 0.01  # fine-tuning learning rate (half the ERM peak: 0.02 wrecks CIFAR-10)
finetune_min_steps = 500  # more whole epochs until this many steps (small data sets need them)
finetune_schedule = "linear"  # "linear": decayed to 0, ending annealed like the ERM; "constant"; "one_cycle"
controls = True  # also fine-tune without masks and with random masks (same everything else)
erm_dir = ""  # a folder where vgg.py trained ERM on the same data: reuse it instead of training
resume = False  # continue an interrupted run (same settings) from its last finished epoch

config = configure(globals())
check(batch_size > 0 and eval_batch_size > 0, "batch sizes must be positive")
check(num_epochs > 0 and finetune_epochs >= 0, "num_epochs must be positive, finetune_epochs >= 0")
check(learning_rate > 0 and finetune_learning_rate > 0, "learning rates must be positive")
check(
    0 <= momentum < 1 and weight_decay >= 0 and warmup_epochs >= 0,
    "momentum must be in [0, 1), weight_decay >= 0",
)
check_choice("dataset", dataset, DATASETS[:5])  # CelebA's attributes are resnet50.py's
check_choice("masking", masking, STRATEGIES)
saliency_settings = dict(mask_settings(config), amp=amp)
heatmap_settings = dict(smoothing=gradient_smoothing, amp=amp)
check_choice("mask_fill", mask_fill, FILLS)
check_choice("finetune_from", finetune_from, ("best", "last"))
check_choice("finetune_schedule", finetune_schedule, FINETUNE_SCHEDULES)
ensure_writable_dir(checkpoint_dir)
ensure_writable_dir(out_dir)
device_ = init_distributed(pick_device(device))  # under torchrun: this process's device
generator = seed_everything(seed)

# ---------------------------------------------------------------------------------------------------------
train_set, val_set, test_set = experiment_data(config)
num_classes = len(train_set.classes)
print(
    f"data: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test images, {num_classes} "
    f"classes ({', '.join(train_set.classes[:10])}), device {device_}"
)
train_images, train_labels = train_set.images.to(device_), train_set.labels.to(device_)
if finetune_epochs:  # at least finetune_min_steps steps
    finetune_epochs = finetune_length(len(train_set), batch_size, finetune_epochs, finetune_min_steps)
epoch_settings = dict(batch_size=batch_size, augment=augment, amp=amp)


def evaluate(model) -> dict:
    """Accuracy on the validation and test sets (the validation set carries the shortcut, if any)."""
    return {
        f"{name}_accuracy": accuracy(
            predict(model, s.images, batch_size=eval_batch_size, amp=amp, desc=name), s.labels
        )
        for name, s in (("val", val_set), ("test", test_set))
    }


def erm_lr(epochs_done: float) -> float:
    """Linear warm-up, then linear decay to 0 at the last epoch."""
    if epochs_done < warmup_epochs:
        return learning_rate * (epochs_done + 1e-3) / warmup_epochs
    return learning_rate * max(0.0, (num_epochs - epochs_done) / max(num_epochs - warmup_epochs, 1e-9))


# 1. ERM ------------------------------------------------------------------------------------------------
model = prepare_model(
    VGGWithAttention(num_classes), device_, channels_last=channels_last, compile_model=compile_model
)
optimizer = torch.optim.SGD(
    model.parameters(), lr=learning_rate, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
)
initial_path, last_path = (os.path.join(checkpoint_dir, f"vgg_{n}.pt") for n in ("initial", "last"))
erm_start = time.time()
if erm_dir:  # reuse a trained ERM model, e.g. to compare masking settings on the same one
    DATA_SETTINGS = [
        "dataset",
        "seed",
        "val_fraction",
        "dry_run",
        "group_csv",
        "shortcut",
        "shortcut_ratio",
        "shortcut_size",
        "shortcut_position",
        "shortcut_classes",
    ]
    check(
        os.path.isfile(os.path.join(erm_dir, "vgg_initial.pt")), f"erm_dir {erm_dir!r} has no vgg_initial.pt"
    )
    erm_last = load_checkpoint(os.path.join(erm_dir, "vgg_last.pt"), "VGGWithAttention", num_classes)
    theirs = erm_last["config"]
    check(
        erm_last["epoch"] == theirs["num_epochs"],
        f"erm_dir {erm_dir!r} holds an unfinished ERM (epoch {erm_last['epoch']} of {theirs['num_epochs']}): "
        "finish it with its own command and --resume=True",
    )
    differing = [k for k in DATA_SETTINGS if theirs.get(k) != config[k]]
    check(
        not differing,
        f"erm_dir {erm_dir!r} holds an ERM trained on other data: "
        + ", ".join(f"{k}={theirs.get(k)!r}" for k in differing),
    )
    if is_main() and os.path.abspath(erm_dir) != os.path.abspath(checkpoint_dir):
        for path in (initial_path, last_path):  # the evaluation scripts find them beside the fine-tunes
            shutil.copyfile(os.path.join(erm_dir, os.path.basename(path)), path)
    print(f"ERM: reusing {erm_dir}")
else:
    history = train(
        model,
        optimizer,
        train_images,
        train_labels,
        epochs=num_epochs,
        generator=generator,
        evaluate=evaluate,
        path=last_path,
        best_path=initial_path,
        config=config,
        resume=resume,
        desc="ERM",
        lr_at=erm_lr,
        **epoch_settings,
    )
    save_training_curves(os.path.join(out_dir, "training_curves.png"), history)
erm_seconds = time.time() - erm_start
erm_best = load_checkpoint(initial_path, "VGGWithAttention", num_classes)
print(
    f"ERM: best validation epoch {erm_best['epoch']} (the latest on ties), test acc "
    f"{100 * erm_best['metrics']['test_accuracy']:.2f}%, {erm_seconds:.0f}s"
)
if finetune_epochs == 0:
    print(f"finetune_epochs=0: ERM only, {initial_path} written")
    raise SystemExit(0)

# 2. masking the training set once, with the frozen best ERM model --------------------------------------
load_weights(model, erm_best, initial_path)
mask_start = time.time()
masks = compute_masks(
    model,
    train_images,
    masking,
    batch_size=eval_batch_size,
    labels=train_labels,
    generator=torch.Generator().manual_seed(seed + 4),
    **saliency_settings,
)
mask_seconds = time.time() - mask_start
masked_fraction = masks.float().mean().item()
masks_sha1 = hashlib.sha1(masks.cpu().numpy().tobytes()).hexdigest()  # which masks a fine-tune saw
print(
    f"masking ({masking}, {mask_fill} fill): {100 * masked_fraction:.2f}% of training pixels masked on "
    f"average, {mask_seconds:.1f}s ({len(masks) / mask_seconds:.0f} images/s)"
)
# with a planted shortcut: do the masks find it? (a researcher's own data has no ground truth for this)
coverage = marker_coverage(masks, train_set) if shortcut else None
if coverage:
    print(
        f"masks hide {100 * coverage['mean']:.1f}% of the planted marker on average, at least half of it on "
        f"{100 * coverage['at_least_half']:.1f}% of the marked training images"
    )
masks_of = {"finetuned": masks}
if controls:  # the same fine-tune without masks, and with each mask moved to a random place
    masks_of["nomask"] = torch.zeros_like(masks)
    masks_of["randommask"] = random_masks_like(masks, torch.Generator().manual_seed(seed + 3))
# the same pairing of images for every fill from another image, so the runs differ only in their masks
variants = {
    name: fill_masks(train_images, m, mask_fill, torch.Generator().manual_seed(seed + 2))
    for name, m in masks_of.items()
}
examples = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:8]
erm_heatmaps = saliency_map(model, train_images[examples], masking, **heatmap_settings)
# test images that break the shortcut (if any): does the fine-tuned model still look at the marker?
shown = evaluation_sets(test_set, config, seed + 1000)["conflicting"] if shortcut else test_set
shown_index = torch.randperm(len(shown), generator=torch.Generator().manual_seed(seed))[:8]
shown_images = shown.images[shown_index].to(device_)
erm_shown_heatmaps = saliency_map(model, shown_images, masking, **heatmap_settings)

# 3. fine-tuning from the ERM weights and optimizer state: MaskTune and its controls ----------------------
start = erm_best if finetune_from == "best" else load_checkpoint(last_path, "VGGWithAttention", num_classes)
results = {"erm": {**erm_best["metrics"], "seconds": erm_seconds}}
for name, images in variants.items():
    load_weights(model, start)
    optimizer.load_state_dict(start["optimizer"])
    extra = {
        "start_weights_sha1": weights_sha1(model),
        "masks_sha1": masks_sha1,
        "masked_fraction": masks_of[name].float().mean().item(),
    }
    history = train(
        model,
        optimizer,
        images,
        train_labels,
        epochs=finetune_epochs,
        generator=torch.Generator().manual_seed(seed + 1),  # the same batches for every variant
        evaluate=evaluate,
        path=os.path.join(checkpoint_dir, f"vgg_{name}.pt"),
        config=config,
        resume=resume,
        desc=f"fine-tune {name}",
        extra=extra,
        lr_at=finetune_lr(finetune_learning_rate, finetune_epochs, finetune_schedule),
        **epoch_settings,
    )
    results[name] = {**extra, **history[-1]}
    if name == "finetuned":  # what was masked, and where the models look before and after
        shown_tuned_heatmaps = saliency_map(model, shown_images, masking, **heatmap_settings)
        mask_pictures = masks[examples, None].expand(-1, 3, -1, -1).to(torch.uint8) * 255
        save_image_grid(
            os.path.join(out_dir, "why.png"),
            {
                "training image": (train_images[examples], None),
                "ERM heatmap": (train_images[examples], erm_heatmaps),
                "mask": (mask_pictures, None),
                "fine-tune sees": (images[examples], None),
                "test image": (shown_images, None),
                "ERM on test": (shown_images, erm_shown_heatmaps),
                "MaskTune on test": (shown_images, shown_tuned_heatmaps),
            },
            titles={
                "training image": [train_set.classes[int(c)] for c in train_labels[examples]],
                "test image": [shown.classes[int(c)] for c in shown.labels[shown_index]],
            },
        )

print(f"{'model':<12}{'test acc':>10}{'val acc':>10}")
for name, stats in results.items():
    print(f"{name:<12}{100 * stats['test_accuracy']:>9.2f}%{100 * stats['val_accuracy']:>9.2f}%")
if is_main():
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(
            {
                "config": config,
                "masked_fraction": masked_fraction,
                "marker_coverage": coverage,
                "masks_sha1": masks_sha1,
                "mask_seconds": mask_seconds,
                "processes": world_size(),
                "results": {k: {m: v for m, v in s.items() if m != "history"} for k, s in results.items()},
            },
            f,
            indent=1,
        )
print(
    f"checkpoints in {checkpoint_dir}/, figures and summary.json in {out_dir}/; next: evaluate_vgg.py with "
    "the same arguments"
)
