"""MaskTune with the report's VGGWithAttention on CIFAR-10 (or any ImageFolder tree of 32x32 images).

Stages:
  1. ERM training                        -> checkpoints/vgg_initial.pt (best validation epoch)
     (or, with `erm_checkpoint`, an existing ERM model trained on the same data)
  2. masking the training set ONCE with the frozen ERM model (strategy: `masking`)
  3. fine-tuning the ERM weights and optimizer state on the masked set -> checkpoints/vgg_finetuned.pt
     and, with `controls`, the same fine-tune without masks and with random masks of the same size
     -> checkpoints/vgg_nomask.pt, checkpoints/vgg_randommask.pt
Figures (masks, training curves) and a summary JSON go to `out_dir`.

    python vgg.py                                  # CIFAR-10, downloaded into data/
    python vgg.py --masking=attention --seed=1     # override any variable below as --name=value
    python vgg.py --data_dir=/path/to/imagefolder  # train/<class>/*.jpg and test/<class>/*.jpg
    python vgg.py --dry_run=True                   # a few hundred images, to check the set-up
    python vgg.py --spurious_ratio=0.95            # plant a class-coloured patch: does MaskTune remove it?
    python vgg.py --spurious_ratio=0.95 --masking=attention --mask_fill=shuffle --finetune_learning_rate=0.01
                                                   # the variant that removes it (README: spurious-patch benchmark)
    torchrun --nproc_per_node=2 vgg.py             # several GPUs or processes (DDP; see README)
    python vgg.py --masking=attention --erm_checkpoint=checkpoints/vgg_initial.pt --checkpoint_dir=checkpoints/att
"""
import hashlib
import json
import os
import time

import torch

from checkpoint import load_checkpoint, load_weights, resumable, save_checkpoint
from config import check, configure, ensure_writable_dir, pick_device, seed_everything
from data import experiment_data, normalize
from distributed import init_distributed, is_main, world_size
from engine import accuracy, finetune, predict, prepare_model, train_erm
from masking import STRATEGIES, apply_masks, compute_masks, random_masks_like, saliency_mask, shuffled_fill
from models import VGG_MEAN, VGG_STD, VGGWithAttention
from plots import save_mask_grid, save_training_curves

# data and output
data_dir = "data"              # CIFAR-10 goes here (downloaded if missing), or an ImageFolder tree
checkpoint_dir = "checkpoints"  # where the .pt files are written
out_dir = "out/vgg"            # figures and the run summary
device = "auto"                # auto = cuda, then mps, then cpu
seed = 0                       # seeds the validation split, initialisation, data order and augmentation
val_size = 5000                # training images held out to pick the best ERM epoch (and selective thresholds)
dry_run = False                # use 512 training and 256 test images: checks the pipeline in seconds
# spurious patch benchmark (0 = plain data): a class-coloured square on spurious_ratio of each class
spurious_ratio = 0.0           # e.g. 0.95: 95% of each class's training images carry their class's colour
spurious_patch_size = 4        # side of the square, in pixels
spurious_position = "top_left"  # top_left, top_right, bottom_left or bottom_right
spurious_conflicting = "other"  # the other training images: "other" class's colour, or "none"
# ERM training
batch_size = 128               # the report used 4; 128 reaches higher accuracy in a fraction of the time
num_epochs = 12                # ERM epochs
learning_rate = 0.02           # peak SGD learning rate (linear warm-up, then linear decay to 0)
warmup_epochs = 1.0            # epochs of linear learning-rate warm-up
momentum = 0.9                 # SGD momentum (Nesterov)
weight_decay = 5e-4            # L2 penalty
augment = True                 # random flips and 4-pixel crops (batched, on the device)
eval_batch_size = 1000         # batch size for evaluation and masking
# speed switches (rounding changes, the method does not; README: Speed)
amp = True                     # bf16 autocast where native (CUDA, CPUs with AVX512-BF16/AMX), masking trunk included
channels_last = True           # NHWC memory format for the convolutions
compile_model = False          # torch.compile the model: compilation takes a while, pays off on long runs
# masking (computed once, with the frozen ERM model)
masking = "xgradcam"           # "xgradcam" (paper) or "attention" (report)
attention_quantile = 0.75      # attention: mask pixels above this per-image quantile of the map
mask_std = 2.0                 # xgradcam: mask pixels above mean + mask_std * std of the positive CAM
masked_pixel_scale = 0.0       # masked pixels are multiplied by this (0 = black as in the paper; report: 0.5)
mask_fill = "black"            # "black" (x masked_pixel_scale) or "shuffle": pixels of a random other image
# fine-tuning
finetune_epochs = 1            # MaskTune fine-tunes for a single epoch (0: train the ERM model only)
finetune_learning_rate = 2e-4  # constant learning rate of the fine-tuning epoch(s) (see README: measured)
controls = True                # also fine-tune without masks and with random masks (same everything else)
erm_checkpoint = ""            # a vgg_initial.pt to start from instead of training ERM (same data settings)
resume = False                 # continue an interrupted run (same config) from its last finished epoch

config = configure(globals())
check(batch_size > 0 and eval_batch_size > 0, "batch sizes must be positive")
check(num_epochs > 0 and finetune_epochs >= 0, "num_epochs must be positive, finetune_epochs >= 0")
check(learning_rate > 0 and finetune_learning_rate > 0, "learning rates must be positive")
check(0 <= momentum < 1 and weight_decay >= 0 and warmup_epochs >= 0, "momentum must be in [0, 1), weight_decay >= 0")
check(masking in STRATEGIES, f"unknown masking strategy {masking!r}; use one of {', '.join(STRATEGIES)}")
check(0 < attention_quantile < 1, "attention_quantile must be between 0 and 1")
check(0 <= masked_pixel_scale < 1, "masked_pixel_scale must be in [0, 1)")
check(mask_fill in ("black", "shuffle"), f"mask_fill must be 'black' or 'shuffle', got {mask_fill!r}")
ensure_writable_dir(checkpoint_dir)
ensure_writable_dir(out_dir)
device_ = init_distributed(pick_device(device))  # under torchrun: this process's device
generator = seed_everything(seed)
norm = dict(mean=VGG_MEAN, std=VGG_STD)

# ------------------------------------------------------------------------------------------------
train_set, val_set, test_set = experiment_data(config)
num_classes = len(train_set.classes)
print(f"data: {len(train_set)} train, {len(val_set) if val_set else 0} validation, {len(test_set)} test images, "
      f"{num_classes} classes, device {device_}")
train_images = train_set.images.to(device_)
train_labels = train_set.labels.to(device_)
eval_sets = {"val": val_set, "test": test_set} if val_set is not None else {"test": test_set}


def evaluate(model) -> dict:
    """Clean accuracy on the validation and test sets."""
    return {f"{name}_accuracy": accuracy(predict(model, s.images, batch_size=eval_batch_size, device=device_,
                                                 desc=name, amp=amp, **norm), s.labels) for name, s in eval_sets.items()}


def data_settings(cfg: dict) -> dict:
    """What an ERM model must share with this run to be reused (the patch settings only matter when on)."""
    keys = ["data_dir", "seed", "val_size", "dry_run"]
    if cfg.get("spurious_ratio", 0.0) > 0:
        keys += ["spurious_patch_size", "spurious_position", "spurious_conflicting"]
    return {"spurious_ratio": cfg.get("spurious_ratio", 0.0), **{k: cfg.get(k) for k in keys}}


# 1. ERM ------------------------------------------------------------------------------------------
model = prepare_model(VGGWithAttention(num_classes), device_, channels_last=channels_last, compile_model=compile_model)
optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, nesterov=momentum > 0,
                            weight_decay=weight_decay)


def erm_schedule(progress: float) -> float:
    if progress < warmup_epochs:
        return learning_rate * (progress + 1e-3) / warmup_epochs
    return learning_rate * max(0.0, (num_epochs - progress) / max(num_epochs - warmup_epochs, 1e-9))


initial_path = os.path.join(checkpoint_dir, "vgg_initial.pt")
erm_start = time.time()
if erm_checkpoint:  # reuse a trained ERM model (e.g. to compare masking strategies on the same one)
    reused = load_checkpoint(erm_checkpoint, "VGGWithAttention", num_classes)
    theirs, ours = data_settings(reused["config"]), data_settings(config)
    check(theirs == ours, f"erm_checkpoint {erm_checkpoint!r} was trained with other data settings: "
          + ", ".join(f"{k}={theirs.get(k)!r}" for k in {**theirs, **ours} if theirs.get(k) != ours.get(k)))
    load_weights(model, reused, erm_checkpoint)
    check(reused["optimizer"] is not None, f"erm_checkpoint {erm_checkpoint!r} has no optimizer state")
    optimizer.load_state_dict(reused["optimizer"])
    if os.path.abspath(erm_checkpoint) != os.path.abspath(initial_path):  # evaluation finds it beside the others
        save_checkpoint(initial_path, model, optimizer, reused["config"], reused["epoch"], reused["metrics"],
                        stage="erm")
    print(f"ERM: reusing {erm_checkpoint} (epoch {reused['epoch']})")
else:
    history = train_erm(model, optimizer, train_images, train_labels, epochs=num_epochs, generator=generator,
                        evaluate=evaluate, config=config, best_path=initial_path, resume=resume,
                        last_path=os.path.join(checkpoint_dir, "vgg_last.pt"), batch_size=batch_size,
                        device=device_, augment=augment, lr_schedule=erm_schedule, amp=amp, **norm)
    save_training_curves(os.path.join(out_dir, "training_curves.png"), history)
erm_seconds = time.time() - erm_start

# 2. masking the training set once, with the frozen best ERM model -------------------------------
erm_state = load_checkpoint(initial_path, "VGGWithAttention", num_classes)
load_weights(model, erm_state, initial_path)
print(f"ERM: best epoch {erm_state['epoch']}, test acc {100 * erm_state['metrics']['test_accuracy']:.2f}%, "
      f"{erm_seconds:.0f}s in all")
if finetune_epochs == 0:
    print(f"finetune_epochs=0: ERM only, {initial_path} written")
    raise SystemExit(0)
mask_start = time.time()
masks = compute_masks(model, train_images, masking, batch_size=eval_batch_size, device=device_,
                      attention_quantile=attention_quantile, num_std=mask_std, amp=amp, **norm)
masked_fraction = masks.float().mean().item()
masks_sha1 = hashlib.sha1(masks.cpu().numpy().tobytes()).hexdigest()  # which masks a fine-tune saw
mask_seconds = time.time() - mask_start
print(f"masking ({masking}): {100 * masked_fraction:.2f}% of training pixels masked on average, "
      f"{mask_seconds:.1f}s ({len(masks) / mask_seconds:.0f} images/s)")
masks_of = {"finetuned": masks}
if controls:  # the same fine-tune without masks, and with each mask moved to a random place
    masks_of["nomask"] = torch.zeros_like(masks)
    masks_of["randommask"] = random_masks_like(masks, generator)
fill = shuffled_fill(train_images, torch.Generator().manual_seed(seed + 2)) if mask_fill == "shuffle" else None
variants = {name: apply_masks(train_images, m, masked_pixel_scale, fill) for name, m in masks_of.items()}

examples = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))[:8]  # varied classes
heatmaps, _ = saliency_mask(model, normalize(train_images[examples].to(device_), **norm), masking,
                            attention_quantile, mask_std)
save_mask_grid(os.path.join(out_dir, "masks.png"), train_images[examples], heatmaps.detach(),
               variants["finetuned"][examples], [train_set.classes[int(c)] for c in train_labels[examples]])

# 3. fine-tuning from the ERM weights and optimizer state: MaskTune and its controls ----------------
results = {"erm": {**erm_state["metrics"], "seconds": erm_seconds}}
for name, images in variants.items():
    path = os.path.join(checkpoint_dir, f"vgg_{name}.pt")
    done = resumable(path, config) if resume else None
    if done is not None:  # finished before the interruption
        print(f"fine-tune {name}: done before, kept {path}")
        results[name] = done["metrics"]
        continue
    load_weights(model, erm_state, initial_path)
    optimizer.load_state_dict(erm_state["optimizer"])
    stats = finetune(model, optimizer, images, train_labels, epochs=finetune_epochs,
                     learning_rate=finetune_learning_rate, data_seed=seed + 1, evaluate=evaluate,
                     config=config, partial_path=os.path.join(checkpoint_dir, f"vgg_{name}.partial.pt"),
                     resume=resume, desc=f"fine-tune {name}", batch_size=batch_size, device=device_,
                     augment=augment, amp=amp, **norm)
    stats.update(masked_fraction=masks_of[name].float().mean().item(), masks_sha1=masks_sha1)
    save_checkpoint(path, model, optimizer, config, erm_state["epoch"] + finetune_epochs, stats,
                    stage=f"finetune-{name}")
    results[name] = stats

print(f"{'model':<12}{'test acc':>10}{'val acc':>10}")
for name, stats in results.items():
    print(f"{name:<12}{100 * stats['test_accuracy']:>9.2f}%{100 * stats.get('val_accuracy', float('nan')):>9.2f}%")
if is_main():
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"config": config, "masked_fraction": masked_fraction, "masks_sha1": masks_sha1,
                   "mask_seconds": mask_seconds, "processes": world_size(),
                   "results": {k: {m: v for m, v in s.items() if m != "history"} for k, s in results.items()}},
                  f, indent=1)
print(f"checkpoints in {checkpoint_dir}/, figures and summary.json in {out_dir}/")
