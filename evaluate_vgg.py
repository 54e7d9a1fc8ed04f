"""Evaluate a vgg.py run: ERM, MaskTune and (when trained) the no-mask and random-mask controls, side by
side, on the clean test set and on the test set masked by the ERM model.

Everything about the run (data, split, masking strategy) is read from the checkpoints' config.

    python evaluate_vgg.py
    python evaluate_vgg.py --checkpoint_dir=checkpoints/seed1 --out_dir=out/eval_seed1

Writes to out_dir: metrics.json, predictions.csv (one row per test image), per_class_accuracy.png.
"""
import csv
import json
import os

import torch

from checkpoint import RUN_MODELS, load_run
from config import check, configure, ensure_writable_dir, pick_device
from data import experiment_data
from engine import predict
from masking import STRATEGIES, apply_masks, compute_masks
from metrics import per_class_accuracy
from models import VGG_MEAN, VGG_STD, VGGWithAttention
from plots import save_grouped_bars

checkpoint_dir = "checkpoints"   # where vgg.py wrote vgg_initial.pt, vgg_finetuned.pt, ...
out_dir = "out/evaluate_vgg"     # metrics.json, predictions.csv, per_class_accuracy.png
data_dir = ""                    # empty: the data_dir stored in the checkpoints
masking = ""                     # masks for the masked test set; empty: the strategy the run used
device = "auto"                  # auto = cuda, then mps, then cpu
eval_batch_size = 1000           # images per forward pass

config = configure(globals())
check(eval_batch_size > 0, "eval_batch_size must be positive")
check(masking in ("", *STRATEGIES), f"unknown masking strategy {masking!r}; use one of {', '.join(STRATEGIES)}")
ensure_writable_dir(out_dir)
device_ = pick_device(device)
norm = dict(mean=VGG_MEAN, std=VGG_STD)

models, states = load_run(checkpoint_dir, "vgg", lambda s: VGGWithAttention(s["num_classes"]), device_)
run_config = dict(states["finetuned"]["config"], **({"data_dir": data_dir} if data_dir else {}))
strategy = masking or run_config["masking"]
_, _, test_set = experiment_data(run_config)
classes = test_set.classes
check(len(classes) == models["initial"].num_classes, "the data's classes do not match the checkpoints")
test_images = test_set.images.to(device_)

test_masks = compute_masks(models["initial"], test_images, strategy, batch_size=eval_batch_size, device=device_,
                           attention_quantile=run_config["attention_quantile"], num_std=run_config["mask_std"], **norm)
masked_test = apply_masks(test_images, test_masks, run_config["masked_pixel_scale"])
logits = {name: predict(m, test_images, batch_size=eval_batch_size, device=device_, **norm) for name, m in models.items()}
masked_logits = {name: predict(m, masked_test, batch_size=eval_batch_size, device=device_, **norm)
                 for name, m in models.items()}

labels = test_set.labels
results = {}
for name in models:
    prediction, masked_prediction = logits[name].argmax(1), masked_logits[name].argmax(1)
    results[name] = {
        "test_accuracy": (prediction == labels).float().mean().item(),
        "per_class_accuracy": dict(zip(classes, per_class_accuracy(prediction, labels, len(classes)))),
        "masked_test_accuracy": (masked_prediction == labels).float().mean().item(),
        "masked_per_class_accuracy": dict(zip(classes, per_class_accuracy(masked_prediction, labels, len(classes)))),
    }

names = list(models)
width = max(10, *(len(c) for c in classes)) + 2
print(f"\n{'class':<{width}}" + "".join(f"{RUN_MODELS[n]:>21}" for n in names))
for c in classes:
    print(f"{c:<{width}}" + "".join(f"{100 * results[n]['per_class_accuracy'][c]:>20.2f}%" for n in names))
print(f"{'total (clean)':<{width}}" + "".join(f"{100 * results[n]['test_accuracy']:>20.2f}%" for n in names))
print(f"{'total (masked)':<{width}}" + "".join(f"{100 * results[n]['masked_test_accuracy']:>20.2f}%" for n in names))
print(f"masked test set: {strategy} masks from the ERM model, {100 * test_masks.float().mean().item():.2f}% of pixels")

with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump({"models": {RUN_MODELS[n]: results[n] for n in names}, "masking": strategy,
               "masked_fraction_test": test_masks.float().mean().item(), "run_config": run_config,
               "checkpoint_epochs": {n: states[n]["epoch"] for n in names}}, f, indent=1)
with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    columns = ["index", "path", "label"]
    for n in names:
        columns += [f"prediction_{n}", f"confidence_{n}", f"prediction_{n}_masked", f"confidence_{n}_masked"]
    writer.writerow(columns)
    probs = {n: logits[n].softmax(1).max(1) for n in names}
    masked_probs = {n: masked_logits[n].softmax(1).max(1) for n in names}
    for i in range(len(test_set)):
        row = [int(test_set.indices[i]), test_set.paths[i] if test_set.paths else "", int(labels[i])]
        for n in names:
            row += [int(probs[n].indices[i]), f"{probs[n].values[i]:.6f}",
                    int(masked_probs[n].indices[i]), f"{masked_probs[n].values[i]:.6f}"]
        writer.writerow(row)
save_grouped_bars(os.path.join(out_dir, "per_class_accuracy.png"), classes,
                  {RUN_MODELS[n]: [100 * results[n]["per_class_accuracy"][c] for c in classes] for n in names})
print(f"wrote metrics.json, predictions.csv and per_class_accuracy.png to {out_dir}/")
