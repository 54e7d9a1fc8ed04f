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

import json
import os
import time

import torch
import torch.nn.functional as F

from masktune.checkpoint import load_checkpoint, load_optimizer, load_weights
from masktune.console import check, check_choice
from masktune.datasets import DATASETS, experiment_data
from masktune.device import describe_machine, prepare_model
from masktune.distributed import is_main, world_size
from masktune.masking import STRATEGIES
from masktune.pipeline import Run, WhyFigure, check_training_settings, masks_sha1, reuse_erm, start_run
from masktune.plots import save_training_curves
from masktune.recipes import configure
from masktune.shortcuts import describe_coverage, marker_coverage
from models import VGGWithAttention

# data and output
data_dir = "data"  # CIFAR-10 (downloaded here if missing), MNIST/raw/, an image folder tree, Waterbirds
dataset = (
    "auto"  # auto: recognised in data_dir (CIFAR-10 if empty); or one of cifar10, mnist, folder, waterbirds
)
checkpoint_dir = "checkpoints"  # where the .pt files are written
out_dir = "out/vgg"  # figures and summary.json (the evaluation scripts write here too)
device = "auto"  # auto = cuda, then mps, then cpu
device_data_gb = -1.0  # GB of training images held on the device, else they stream from host memory batch
# by batch (-1: up to half the GPU's free memory; 0: always stream)
seed = 0  # seeds the validation split, initialisation, data order and augmentation
val_fraction = 0.1  # training images held out to pick the ERM epoch (where the data has no val split)
group_csv = ""  # image folders: group labels of validation and test images (columns: path, group)
group_column = "group"  # the group_csv column holding the group
cache_dir = ""  # e.g. data/cache: decoded image files kept as tensors for the next run
dry_run = False  # 512 training and 256 test images, one epoch of each stage: checks the set-up in seconds
# planted shortcut (see shortcuts.py): a marker tied to the class on most training images
shortcut = ""  # "" (none), "square", "moving_square", "shape", "frame", "scene", "grain" or "colour_cast"
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
masking = "integrated"  # saliency: "gradient" (gradient x input), "integrated" (integrated gradients from
# the decisive test's partner image), "attention" (the model's attention map), "xgradcam" (the paper's),
# or "planted": a planted shortcut's own pixels, what perfect masks would do (an upper bound)
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
mask_quantile = 0.97  # fixed extent, gradient, attention: pixels above this per-image quantile of the map
gradient_smoothing = 0.15  # gradient, integrated: box-filter side, as a fraction of the image side
mask_std = 2.0  # fixed extent, xgradcam: pixels above mean + mask_std * std of the positive CAM
mask_fill = "shuffle_union"  # "shuffle_union", "shuffle" or "swap": pixels of a random other image (see
# masking.py); "black" (the paper)
finetune_from = "last"  # the ERM epoch (and optimizer state) the fine-tune starts from: "last" or "best"
finetune_epochs = 5  # the paper: 1; the masked images are the model's first lesson on the objects, and five
# epochs lift every development marker's validation worst group (RESULTS.md). 0: train the ERM model only
finetune_learning_rate = 0.01  # fine-tuning learning rate (half the ERM peak: 0.02 wrecks CIFAR-10)
finetune_min_steps = 500  # more whole epochs until this many steps (small data sets need them)
finetune_schedule = "linear"  # "linear": decayed to 0, ending annealed like the ERM; "constant"; "one_cycle"
controls = True  # also fine-tune without masks and with random masks (same everything else)
erm_dir = ""  # a folder where vgg.py trained ERM on the same data: reuse it instead of training
resume = False  # continue an interrupted run (same settings) from its last finished epoch

config = configure(globals())
check_training_settings(config, (*STRATEGIES, "planted"))
check(warmup_epochs >= 0, "warmup_epochs must be >= 0")
check_choice("dataset", dataset, DATASETS[:5])  # CelebA's attributes are resnet50.py's
device_, generator, memory = start_run(config)  # folders, device (torchrun: this process's), seeds, memory


def training_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of every training stage (ERM and the fine-tunes); edit it to train with another. The
    accuracies the run reports do not use it."""
    return F.cross_entropy(logits, labels)


def erm_lr(epochs_done: float) -> float:
    """Linear warm-up, then linear decay to 0 at the last epoch."""
    if epochs_done < warmup_epochs:
        return learning_rate * (epochs_done + 1e-3) / warmup_epochs
    return learning_rate * max(0.0, (num_epochs - epochs_done) / max(num_epochs - warmup_epochs, 1e-9))


# ---------------------------------------------------------------------------------------------------------
train_set, val_set, test_set = experiment_data(config)
run = Run(config, device_, train_set, val_set, test_set, training_loss, prefix="vgg")
num_classes = len(train_set.classes)
print(
    f"data: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test images, {num_classes} "
    f"classes ({', '.join(train_set.classes[:10])}), device {device_}"
    f"{', training images streamed from host memory' if run.streamed else ''}"
)
memory.record("data")

# 1. ERM ------------------------------------------------------------------------------------------------
model = prepare_model(
    VGGWithAttention(num_classes), device_, channels_last=channels_last, compile_model=compile_model
)
optimizer = torch.optim.SGD(
    model.parameters(), lr=learning_rate, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
)
erm_start = time.time()
if erm_dir:  # reuse a trained ERM model, e.g. to compare masking settings on the same one
    reuse_erm(run, erm_dir, "VGGWithAttention")
    print(f"ERM: reusing {erm_dir}")
else:
    erm = run.stage("ERM", "last", best_path=run.path("initial"))
    history = run.train(model, optimizer, erm, epochs=run.erm_epochs, lr_at=erm_lr, generator=generator)
    save_training_curves(os.path.join(out_dir, "training_curves.png"), history)
erm_seconds = time.time() - erm_start
memory.record("ERM")
erm_best = load_checkpoint(run.path("initial"), "VGGWithAttention", num_classes)
print(
    f"ERM: best validation epoch {erm_best['epoch']} (the latest on ties), test acc "
    f"{100 * erm_best['metrics']['test_accuracy']:.2f}%, {erm_seconds:.0f}s"
)
if finetune_epochs == 0:
    print(f"finetune_epochs=0: ERM only, {run.path('initial')} written")
    raise SystemExit(0)

# 2. masking the training set with the frozen best ERM model (mask_rounds > 1: again after a fine-tune) ---
start = (
    erm_best
    if finetune_from == "best"
    else load_checkpoint(run.path("last"), "VGGWithAttention", num_classes)
)
load_weights(model, erm_best, run.path("initial"))
mask_start = time.time()
masks = run.masks(model, optimizer, start)  # with mask_rounds > 1, fine-tunes from start in between
mask_seconds = time.time() - mask_start
memory.record("masking")
masked_fraction = masks.fraction()
rate = (
    f"{len(masks) / mask_seconds:.0f} images/s"
    if mask_rounds == 1
    else f"{mask_rounds} rounds, fine-tunes included"
)
print(
    f"masking ({masking}, {mask_extent} extent, {mask_fill} fill): {100 * masked_fraction:.2f}% of training "
    f"pixels masked on average, {mask_seconds:.1f}s ({rate})"
)
print(run.describe_class_mask_rates())
# with a planted shortcut: do the masks find it? (a researcher's own data has no ground truth for this)
coverage = marker_coverage(masks[:], train_set) if shortcut else None
if coverage:
    print(describe_coverage(coverage))
figure = WhyFigure(run, model, masks)  # where the ERM model looks, before the fine-tunes change it

# 3. fine-tuning from the ERM weights and optimizer state: MaskTune and its controls ----------------------
results = {"erm": {**erm_best["metrics"], "seconds": erm_seconds}}
for name, images in run.fine_tune_sets(masks).items():  # finetuned, and the controls nomask, randommask
    load_weights(model, start)
    load_optimizer(optimizer, start)
    history = run.fine_tune(model, optimizer, name, images, extra={"masks_sha1": masks_sha1(masks)})
    results[name] = {"masked_fraction": images.masks.fraction(), **history[-1]}
    if name == "finetuned":  # what was masked, and where the models look before and after
        figure.save(os.path.join(out_dir, "why.png"), model, images)

memory.record("fine-tunes")
print(memory)
print(f"{'model':<12}{'test acc':>10}{'val acc':>10}")
for name, stats in results.items():
    print(f"{name:<12}{100 * stats['test_accuracy']:>9.2f}%{100 * stats['val_accuracy']:>9.2f}%")
if is_main():
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(
            {
                "config": config,
                "finetune_epochs_run": run.finetune_epochs,
                "masked_fraction": masked_fraction,
                "class_mask_rates": run.class_mask_rates,
                "marker_coverage": coverage,
                "masks_sha1": masks_sha1(masks),
                "mask_seconds": mask_seconds,
                "processes": world_size(),
                "machine": describe_machine(device_),
                "peak_memory_gb": memory.stages,
                "results": {k: {m: v for m, v in s.items() if m != "history"} for k, s in results.items()},
            },
            f,
            indent=1,
        )
print(
    f"checkpoints in {checkpoint_dir}/, figures and summary.json in {out_dir}/; next: evaluate_vgg.py with "
    "the same arguments"
)
