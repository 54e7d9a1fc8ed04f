"""MaskTune with ResNet50 on CelebA attributes (multi-label, BCE), the report's section 3.3, evaluated.

Stages:
  1. ERM: an ImageNet-pretrained torchvision ResNet50 fine-tuned on the target attributes
     -> checkpoints/resnet50_initial.pt (best validation epoch, by mean attribute accuracy)
  2. masking, chosen by `masking`:
     "xgradcam" (the paper's): the training images are masked ONCE by the frozen ERM model (XGradCAM of
                the predicted labels, mean + 2 std threshold); ResNet50 is fine-tuned on them.
     "feature"  (the report's): AttentionMaskingResNet50 (ERM backbone AND classifier, plus a learned
                sigmoid mask over the feature map) is fine-tuned on the clean images.
     -> checkpoints/resnet50_finetuned.pt; with `controls`, the same fine-tune without masks
     (resnet50_nomask.pt) and, for xgradcam, with random masks of the same size (resnet50_randommask.pt)
  3. evaluation (in this script) of every model on the test split: per-attribute accuracy, precision,
     recall, F1; accuracy in the groups (attribute, spurious_attribute) and the worst group per attribute
     -> out_dir/metrics.json, out_dir/predictions.csv

    python resnet50.py                                   # data/celeba, the report's 10 attributes
    python resnet50.py --target_attributes=Blond_Hair    # the paper's benchmark (groups with Male)
    python resnet50.py --pretrained=False --image_size=64 --subset_size=2000 --masking=feature
"""
import csv
import json
import os
import time

import torch
import torch.nn.functional as F

from checkpoint import RUN_MODELS, load_checkpoint, load_weights, resumable, save_checkpoint
from config import check, configure, ensure_writable_dir, pick_device, seed_everything
from data import load_celeba
from distributed import init_distributed, is_main
from engine import accuracy, finetune, predict, prepare_model, train_erm
from masking import apply_masks, compute_masks, random_masks_like
from metrics import attribute_group_accuracy, attribute_metrics
from models import IMAGENET_MEAN, IMAGENET_STD, AttentionMaskingResNet50, ResNet50

# data and output
data_dir = "data/celeba"       # the Kaggle archive or torchvision's CelebA files (see README)
checkpoint_dir = "checkpoints"  # where the .pt files are written
out_dir = "out/resnet50"       # metrics.json, predictions.csv
device = "auto"                # auto = cuda, then mps, then cpu
seed = 0                       # subsets, initialisation of the head, data order, augmentation
target_attributes = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
                     "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair"]  # the report's first 10 attributes
spurious_attribute = "Male"    # groups = (target attribute, this attribute); worst-group accuracy
image_size = 224               # Resize + CenterCrop size
subset_size = 1000             # random training images (0 = all); decoded images are held in memory
eval_subset_size = 2000        # random validation and test images each (0 = all)
decode_workers = 8             # threads decoding JPEGs (PIL decodes in parallel outside the GIL)
cache_dir = ""                 # e.g. data/cache: keep the decoded images there and skip decoding next time
pretrained = True              # ImageNet weights from torchvision (downloaded)
weights_path = ""              # or a local torchvision resnet50 weights file
# ERM training
batch_size = 32                # the report's batch size
num_epochs = 20                # the report's ERM epochs
learning_rate = 0.001          # SGD learning rate (constant, as in the report)
momentum = 0.9                 # SGD momentum
weight_decay = 1e-4            # L2 penalty
augment = True                 # random flips and 4-pixel crops
eval_batch_size = 128          # evaluation and masking batch size
# speed switches (rounding changes, the method does not; README: Speed)
amp = True                     # bf16 autocast where native (CUDA, CPUs with AVX512-BF16/AMX), masking trunk included
channels_last = True           # NHWC memory format for the convolutions
compile_model = False          # torch.compile the models: compilation takes a while, pays off on long runs
# masking and fine-tuning
masking = "xgradcam"           # "xgradcam" (paper: input masks) or "feature" (report: learned feature mask)
mask_std = 2.0                 # xgradcam: mask pixels above mean + mask_std * std of the positive CAM
masked_pixel_scale = 0.0       # masked pixels are multiplied by this (0 = black)
finetune_epochs = 1            # MaskTune fine-tunes for one epoch
finetune_learning_rate = 1e-4  # the report's fine-tuning learning rate
controls = True                # also the no-mask (and for xgradcam the random-mask) fine-tunes
resume = False                 # continue an interrupted run (same config) from its last finished ERM epoch

config = configure(globals())
check(batch_size > 0 and eval_batch_size > 0, "batch sizes must be positive")
check(num_epochs > 0 and finetune_epochs > 0, "num_epochs and finetune_epochs must be positive")
check(learning_rate > 0 and finetune_learning_rate > 0, "learning rates must be positive")
check(0 <= momentum < 1 and weight_decay >= 0, "momentum must be in [0, 1), weight_decay >= 0")
check(masking in ("xgradcam", "feature"), f"unknown masking strategy {masking!r}; use xgradcam or feature")
check(image_size >= 32, "image_size must be at least 32")
check(subset_size >= 0 and eval_subset_size >= 0, "subset sizes must be >= 0 (0 = all)")
ensure_writable_dir(checkpoint_dir)
ensure_writable_dir(out_dir)
device_ = init_distributed(pick_device(device))  # under torchrun: this process's device
generator = seed_everything(seed)
norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)

# ------------------------------------------------------------------------------------------------
splits = load_celeba(data_dir, target_attributes, spurious_attribute, image_size, subset_size, eval_subset_size, seed,
                     decode_workers, cache_dir)
train_set, val_set, test_set = splits["train"], splits["val"], splits["test"]
num_attributes = len(target_attributes)
print(f"data: {len(train_set)} train, {len(val_set)} validation, {len(test_set)} test images, "
      f"{num_attributes} attributes, {image_size}x{image_size}, device {device_}")
train_images, train_labels = train_set.images.to(device_), train_set.labels.to(device_)
train_kwargs = dict(batch_size=batch_size, device=device_, augment=augment,
                    loss_fn=F.binary_cross_entropy_with_logits, amp=amp, **norm)
speed = dict(channels_last=channels_last, compile_model=compile_model)


def evaluate(model) -> dict:
    """Mean attribute accuracy on the validation and test splits."""
    return {f"{name}_accuracy": accuracy(predict(model, s.images, batch_size=eval_batch_size, device=device_,
                                                 desc=name, amp=amp, **norm), s.labels)
            for name, s in (("val", val_set), ("test", test_set))}


def new_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay)


# 1. ERM ------------------------------------------------------------------------------------------
model = prepare_model(ResNet50(num_attributes, pretrained, weights_path), device_, **speed)
optimizer = new_optimizer(model)
initial_path = os.path.join(checkpoint_dir, "resnet50_initial.pt")
erm_start = time.time()
train_erm(model, optimizer, train_images, train_labels, epochs=num_epochs, generator=generator, evaluate=evaluate,
          config=config, best_path=initial_path, last_path=os.path.join(checkpoint_dir, "resnet50_last.pt"),
          resume=resume, **train_kwargs)
erm_state = load_checkpoint(initial_path, "ResNet50", num_attributes)
print(f"ERM: best epoch {erm_state['epoch']}, {time.time() - erm_start:.0f}s")

# 2. masking and fine-tuning ----------------------------------------------------------------------
def erm_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh copy of the best ERM model with its optimizer state."""
    fresh = prepare_model(load_weights(ResNet50(num_attributes), erm_state, initial_path), device_, **speed)
    fresh_optimizer = new_optimizer(fresh)
    fresh_optimizer.load_state_dict(erm_state["optimizer"])
    return fresh, fresh_optimizer


runs = {}  # name -> (model, optimizer, training images, masked fraction)
if masking == "xgradcam":
    frozen, _ = erm_model()
    masks = compute_masks(frozen, train_images, "xgradcam", batch_size=eval_batch_size, device=device_,
                          num_std=mask_std, multilabel=True, amp=amp, **norm)
    print(f"masking (xgradcam): {100 * masks.float().mean():.2f}% of training pixels masked on average")
    runs["finetuned"] = (*erm_model(), apply_masks(train_images, masks, masked_pixel_scale), masks.float().mean().item())
    if controls:
        random_masks = random_masks_like(masks, generator)
        runs["randommask"] = (*erm_model(), apply_masks(train_images, random_masks, masked_pixel_scale),
                              random_masks.float().mean().item())
else:  # the report's learned feature mask: a new module, so both it and its control get a fresh optimizer
    masking_model = prepare_model(AttentionMaskingResNet50.from_resnet(erm_model()[0]), device_, **speed)
    runs["finetuned"] = (masking_model, new_optimizer(masking_model), train_images, 0.0)
if controls:
    control, control_optimizer = erm_model()
    runs["nomask"] = (control, control_optimizer if masking == "xgradcam" else new_optimizer(control), train_images, 0.0)

models = {"initial": erm_model()[0]}
for name, (net, net_optimizer, images, masked_fraction) in runs.items():
    path = os.path.join(checkpoint_dir, f"resnet50_{name}.pt")
    done = resumable(path, config) if resume else None
    if done is not None:  # finished before the interruption
        print(f"fine-tune {name}: done before, kept {path}")
        models[name] = load_weights(net, done, path)
        continue
    stats = finetune(net, net_optimizer, images, train_labels, epochs=finetune_epochs,
                     learning_rate=finetune_learning_rate, data_seed=seed + 1, evaluate=evaluate,
                     config=config, partial_path=os.path.join(checkpoint_dir, f"resnet50_{name}.partial.pt"),
                     resume=resume, desc=f"fine-tune {name}", **train_kwargs)
    stats["masked_fraction"] = masked_fraction
    save_checkpoint(path, net, net_optimizer, config, erm_state["epoch"] + finetune_epochs, stats,
                    stage=f"finetune-{name}")
    models[name] = net

# 3. evaluation on the test split -----------------------------------------------------------------
probabilities = {n: predict(m, test_set.images, batch_size=eval_batch_size, device=device_, desc=f"test {n}",
                            amp=amp, **norm).sigmoid() for n, m in models.items()}
labels, spurious = test_set.labels, test_set.patch_class
results = {}
for n, p in probabilities.items():
    results[RUN_MODELS[n]] = {**attribute_metrics(p > 0.5, labels, target_attributes),
                              "groups": attribute_group_accuracy(p > 0.5, labels, spurious, target_attributes,
                                                                 spurious_attribute)}
names = list(results)
print(f"\n{'attribute (test)':<20}" + "".join(f"{n:>21}" for n in names) + "   (accuracy / worst group)")
for a in target_attributes:
    print(f"{a:<20}" + "".join(f"{100 * results[n]['per_attribute'][a]['accuracy']:>11.2f} / "
                               f"{100 * results[n]['groups'][a]['worst_group_accuracy']:>5.1f}" for n in names))
for key in ("mean_accuracy", "mean_precision", "mean_recall", "mean_f1"):
    print(f"{key:<20}" + "".join(f"{100 * results[n][key]:>20.2f}%" for n in names))
if "Blond_Hair" in target_attributes and spurious_attribute == "Male":
    print("Blond_Hair x Male worst-group accuracy (paper: ERM ~47%, MaskTune 78.0%): " + ", ".join(
        f"{n} {100 * results[n]['groups']['Blond_Hair']['worst_group_accuracy']:.2f}%" for n in names))
if not is_main():  # under torchrun, rank 0 writes the tables
    raise SystemExit(0)
with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump({"models": results, "config": config, "test_images": len(test_set)}, f, indent=1)
with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["index", "path", spurious_attribute, *[f"label_{a}" for a in target_attributes],
                     *[f"probability_{n}_{a}" for n in models for a in target_attributes]])
    for i in range(len(test_set)):
        writer.writerow([int(test_set.indices[i]), test_set.paths[i], int(spurious[i]),
                         *[int(v) for v in labels[i].tolist()],
                         *[f"{probabilities[n][i, a]:.6f}" for n in models for a in range(num_attributes)]])
print(f"checkpoints in {checkpoint_dir}/, metrics.json and predictions.csv in {out_dir}/")
