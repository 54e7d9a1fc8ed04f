"""MaskTune with ResNet50 on CelebA, Waterbirds or your own image folders, with group metrics.

The data set is recognised in `data_dir` (datasets.py): CelebA attributes (multi-label, binary
cross-entropy, groups with `spurious_attribute`), Waterbirds (metadata.csv; groups bird x place), or an
image folder tree train/<class>/*, optional val/<class>/*, test/<class>/* (optional `group_csv`).
  1. ERM: ResNet50 (ImageNet weights with `pretrained`) -> checkpoints/resnet50_initial.pt (the epoch with
     the best validation accuracy: no group labels are used to choose it) and resnet50_last.pt
  2. masking, chosen by `masking`:
     "xgradcam" / "attention": the frozen best ERM model masks the training images ONCE (the paper);
                ResNet50 is fine-tuned on them from the ERM weights and optimizer state
     "feature"  (the report's): AttentionMaskingResNet50 (ERM backbone AND classifier, plus a learned
                sigmoid mask over the feature map) is fine-tuned on the clean images
     -> resnet50_finetuned.pt; with `controls`, the same fine-tune without masks (resnet50_nomask.pt) and,
     for input masks, with the masks moved to random places (resnet50_randommask.pt)
  3. evaluation on the test split: accuracy, per-group, worst-group and average-group accuracy of every
     model (CelebA: per attribute, with precision, recall, F1) -> out_dir/metrics.json, predictions.csv

    python resnet50.py                                          # data/celeba, the report's 10 attributes
    python resnet50.py config/celeba_blond.py                   # the paper's CelebA benchmark
    python resnet50.py config/waterbirds.py                     # the paper's Waterbirds benchmark
    python resnet50.py --data_dir=/path/to/images --image_size=128 --pretrained=False
"""

import json
import os
import time

import torch
import torch.nn.functional as F

from masktune.checkpoint import RUN_MODELS, load_checkpoint, load_optimizer, load_run, load_weights
from masktune.console import check, check_choice
from masktune.datasets import experiment_data
from masktune.device import describe_machine, prepare_model
from masktune.distributed import is_main
from masktune.engine import predict_all
from masktune.masking import STRATEGIES
from masktune.metrics import evaluate_predictions, format_evaluation, write_predictions
from masktune.pipeline import Run, check_training_settings, masks_sha1, start_run
from masktune.recipes import configure
from masktune.shortcuts import describe_coverage, marker_coverage, shortcut_evaluation
from models import AttentionMaskingResNet50, ResNet50

# data and output
data_dir = "data/celeba"  # CelebA (Kaggle or torchvision layout), Waterbirds, or an image folder tree
dataset = "auto"  # auto: recognised in data_dir; or one of celeba, waterbirds, folder
checkpoint_dir = "checkpoints"  # where the .pt files are written
out_dir = "out/resnet50"  # metrics.json, predictions.csv (selective_classification_resnet.py writes here too)
device = "auto"  # auto = cuda, then mps, then cpu
device_data_gb = -1.0  # GB of training images held on the device, else they stream from host memory batch
# by batch (-1: up to half the GPU's free memory; 0: always stream)
seed = 0  # subsets, the validation split, the head's initialisation, data order, augmentation
target_attributes = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
]  # CelebA: the report's first 10 attributes
spurious_attribute = "Male"  # CelebA: groups are (target attribute, this attribute)
image_size = 224  # shorter side resized to this, then centre-cropped
subset_size = (
    0  # random training images to keep (0 = all); decoded images are held in memory, 150 KB each at 224
)
eval_subset_size = 0  # random validation and test images to keep, each (0 = all)
val_fraction = 0.1  # image folders without val/: training images held out for validation
group_csv = ""  # image folders: group labels of validation and test images (columns: path, group)
group_column = "group"  # the group_csv column holding the group
cache_dir = ""  # e.g. data/cache: decoded images kept as tensors for the next run
# a shortcut planted in the training and validation images of classes (see shortcuts.py), as vgg.py does
shortcut = ""  # "" (none), "square", "moving_square", "shape", "frame", "scene", "grain" or "colour_cast"
shortcut_ratio = 0.95  # fraction of each class's training images carrying their own class's marker
shortcut_size = 8  # marker side, frame width, shrunk object side (8 of 64 pixels: vgg.py's 4 of 32)
shortcut_position = "top_left"  # a fixed marker's corner
shortcut_classes = "all"  # "all": a marker per class; "first": class 0's only
dry_run = False  # 512 training and 256 test images, one epoch of each stage: checks the set-up in seconds
pretrained = True  # torchvision's ImageNet weights (downloaded)
weights_path = ""  # or a local copy of them (resnet50-0676ba61.pth)
# ERM training
batch_size = 32  # the report's batch size
num_epochs = 20  # the report's ERM epochs
learning_rate = 0.001  # SGD learning rate (constant, as in the report and the paper's code)
momentum = 0.9  # SGD momentum
weight_decay = 1e-4  # L2 penalty
augment = True  # random flips and 4-pixel crops
eval_batch_size = 128  # evaluation and masking batch size
# speed switches (rounding changes, the method does not)
amp = True  # bf16 autocast where native (CUDA, CPUs with AVX512-BF16/AMX), masking trunk included
channels_last = True  # NHWC memory format for the convolutions
compile_model = False  # torch.compile the models: compilation takes a while, pays off on long runs
# MaskTune
masking = "integrated"  # "integrated", "gradient", "attention", "xgradcam" (input masks, masking.py),
# "feature" (the report's learned feature mask), "planted" (a planted shortcut's pixels: an upper bound)
mask_extent = "decisive"  # per image, the smallest top region the prediction follows (none: no mask);
# "fixed": mask_quantile (gradient, attention) or mask_std (xgradcam); see masking.py
mask_widen = False  # decisive, gradient: grow each mask by half the smoothing side. Hides a 12x12 marker's
# rim (its val conflicting 20 -> 44%) but more of the object around a 4x4 one (its clean 68 -> 61%)
mask_complete = True  # decisive: grow each mask through the flat colour of its most salient pixel, a
# flat marker's rim (not a colour over a quarter of the image). The 12x12 square's val conflicting 20 -> 52%
mask_complete_first = True  # decisive, complete: test each candidate region completed, the region the mask
# will hide (a large marker whole), not its blurred core: the 12x12 square's val worst group 20 -> 27%
mask_class_share = 0.5  # decisive: masks only where a region decides at least this share of some class's
# images (a shortcut: the markers 56-99%; not a few objects: plain CIFAR-10 <= 23%), else none. Judged
# before the consensus, which would let a class's centred objects pass (see masking.py)
mask_consensus = 0.3  # decisive, > 0: also each class's consensus, the pixels masked on this share of its
# masked images, where it decides an image's prediction: a still shortcut larger than any top region (the
# frame's val conflicting 12 -> 44%; the squares' worst group within 2 points; 3 seeds); 0: off. masking.py
mask_rounds = 1  # > 1: fine-tune on the masks, then add the masks of the fine-tuned model (what it learned
# instead: a large marker's unmasked rim), this many rounds in all; see pipeline.Run.masks
mask_round_reach = 0.0  # further rounds add only pixels this close to the masks so far (a fraction of the
# image side: a large marker's rim, not the object elsewhere); 0: anywhere
mask_quantile = 0.97  # fixed extent: pixels above this per-image quantile of the map (3%)
gradient_smoothing = 0.15  # gradient, integrated: box-filter side, as a fraction of the image side
mask_std = 2.0  # xgradcam: mask pixels above mean + mask_std * std of the positive CAM
mask_fill = "shuffle_union"  # "shuffle_union", "shuffle" or "swap": pixels of a random other image (see
# masking.py); "black" (the paper)
finetune_from = "last"  # the ERM epoch (and optimizer state) the fine-tune starts from: "last" or "best"
finetune_epochs = 1  # MaskTune fine-tunes for one epoch
finetune_learning_rate = 1e-3  # the ERM's rate, as in the paper's code (the report used 1e-4)
finetune_min_steps = 500  # more whole epochs until this many steps (small data sets need them)
finetune_schedule = "constant"  # "constant", "linear" (decayed to 0) or "one_cycle" (warm-up, then decay)
controls = True  # also the no-mask (and, for input masks, the random-mask) fine-tunes
resume = False  # continue an interrupted run (same settings) from its last finished epoch

config = configure(globals())
check_training_settings(config, (*STRATEGIES, "feature", "planted"))
check(finetune_epochs > 0, "finetune_epochs must be positive")
check_choice("dataset", dataset, ("auto", "celeba", "waterbirds", "folder"))
check(image_size >= 32, "image_size must be at least 32")
check(subset_size >= 0 and eval_subset_size >= 0, "subset sizes must be >= 0 (0 = all)")
device_, generator, memory = start_run(config)  # folders, device (torchrun: this process's), seeds, memory


def training_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of every training stage; edit it to train with another (the metrics do not use it). CelebA's
    attributes are 0/1 labels: binary cross-entropy; classes: cross-entropy."""
    if labels.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.cross_entropy(logits, labels)


def new_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------------------------------
train_set, val_set, test_set = experiment_data(config, fallback="")
run = Run(config, device_, train_set, val_set, test_set, training_loss, prefix="resnet50")
multilabel = train_set.labels.is_floating_point()  # CelebA attributes
print(
    f"data: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test images, "
    f"{len(train_set.classes)} {'attributes' if multilabel else 'classes'} "
    f"({', '.join(train_set.classes[:10])}), {image_size}x{image_size}, "
    f"groups {'known' if test_set.spurious is not None else 'unknown'}, device {device_}"
    f"{', training images streamed from host memory' if run.streamed else ''}"
)
memory.record("data")
speed = dict(channels_last=channels_last, compile_model=compile_model)

# 1. ERM ------------------------------------------------------------------------------------------------
model = prepare_model(ResNet50(len(train_set.classes), pretrained, weights_path), device_, **speed)
optimizer = new_optimizer(model)
erm_start = time.time()
erm = run.stage("ERM", "last", best_path=run.path("initial"))
run.train(model, optimizer, erm, epochs=run.erm_epochs, lr_at=lambda done: learning_rate, generator=generator)
erm_best = load_checkpoint(run.path("initial"), "ResNet50")
print(
    f"ERM: best validation epoch {erm_best['epoch']} (validation accuracy, no group labels; the latest on "
    f"ties), {time.time() - erm_start:.0f}s"
)
start = erm_best if finetune_from == "best" else load_checkpoint(run.path("last"), "ResNet50")
memory.record("ERM")

# 2. masking with the frozen best ERM model (mask_rounds > 1: again after a fine-tune), then the fine-tunes
if masking == "feature":  # the report's learned feature mask: the clean images, a new module
    variants = {"finetuned": run.train_images, **({"nomask": run.train_images} if controls else {})}
    extra, mask_facts = {}, {}
else:
    load_weights(model, erm_best, run.path("initial"))
    masks = run.masks(model, optimizer, start)  # with mask_rounds > 1, fine-tunes from start in between
    masked_fraction = masks.fraction()  # unpacks every mask: once
    print(
        f"masking ({masking}, {mask_extent} extent, {mask_fill} fill): {100 * masked_fraction:.2f}% of "
        "training pixels masked"
    )
    print(run.describe_class_mask_rates())
    coverage = marker_coverage(masks[:], train_set) if shortcut else None
    if coverage:  # with a planted shortcut: do the masks find it?
        print(describe_coverage(coverage))
    mask_facts = {
        "masked_fraction": masked_fraction,
        "class_mask_rates": run.class_mask_rates,
        "marker_coverage": coverage,
    }
    variants, extra = run.fine_tune_sets(masks), {"masks_sha1": masks_sha1(masks)}
    memory.record("masking")
for name, images in variants.items():
    net = load_weights(ResNet50(len(train_set.classes)), start)
    if masking == "feature" and name == "finetuned":  # ERM backbone and classifier, plus a learned mask
        net = AttentionMaskingResNet50.from_resnet(net)
    net = prepare_model(net, device_, **speed)
    net_optimizer = new_optimizer(net)
    if masking != "feature":  # the paper continues the ERM optimizer; the report's variant starts afresh
        load_optimizer(net_optimizer, start)
    run.fine_tune(net, net_optimizer, name, images, extra=extra)
memory.record("fine-tunes")

# 3. evaluation on the test split -------------------------------------------------------------------------
models, _ = load_run(checkpoint_dir, "resnet50", device_, (ResNet50, AttentionMaskingResNet50))


def logits_of(images: torch.Tensor) -> dict:
    return predict_all(models, images, batch_size=eval_batch_size, amp=amp)


if shortcut:  # also the test and validation images with their own class's marker and with another's
    planted, _, shifted_logits = shortcut_evaluation(logits_of, test_set, val_set, config)
    logits = shifted_logits["clean"]  # the test images as they are
else:
    planted, logits = {}, logits_of(test_set.images)
results = evaluate_predictions(logits, test_set, train_set)
for name, metrics in planted.items():
    results[RUN_MODELS[name]].update(metrics)
print(format_evaluation(results, test_set))
memory.record("evaluation")
print(memory)
if is_main():
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        facts = {"run_config": config, "test_images": len(test_set), "machine": describe_machine(device_)}
        facts |= {"peak_memory_gb": memory.stages, **mask_facts}
        json.dump({"models": results, **facts}, f, indent=1)
    write_predictions(os.path.join(out_dir, "predictions.csv"), {"test": logits}, {"test": test_set})
print(f"checkpoints in {checkpoint_dir}/, metrics.json and predictions.csv in {out_dir}/")
