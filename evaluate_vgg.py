"""Evaluate a vgg.py run: ERM, MaskTune and (when trained) the no-mask and random-mask controls, side by
side, on the clean test set and on the test set masked by the ERM model. When the run used a spurious patch,
also on the bias-aligned and bias-conflicting test sets, with group (class, patch colour) and worst-group
accuracy; with group_csv, per-group accuracy for a researcher's own group labels.

Everything about the run (data, split, masking strategy) is read from the checkpoints' config.

    python evaluate_vgg.py
    python evaluate_vgg.py --checkpoint_dir=checkpoints/seed1 --out_dir=out/eval_seed1

Writes to out_dir: metrics.json, predictions.csv (one row per test image and test set),
per_class_accuracy.png, and with a spurious patch conflicting_heatmaps.png.
"""
import csv
import json
import os

import torch

from checkpoint import RUN_MODELS, load_run
from config import check, configure, ensure_writable_dir, pick_device
from data import experiment_data, normalize, read_group_csv, spurious_test_sets
from engine import predict
from masking import STRATEGIES, apply_masks, compute_masks, saliency_mask
from metrics import group_accuracy, per_class_accuracy
from models import VGG_MEAN, VGG_STD, VGGWithAttention
from plots import save_grouped_bars, save_heatmap_comparison

checkpoint_dir = "checkpoints"   # where vgg.py wrote vgg_initial.pt, vgg_finetuned.pt, ...
out_dir = "out/evaluate_vgg"     # metrics.json, predictions.csv, per_class_accuracy.png
data_dir = ""                    # empty: the data_dir stored in the checkpoints
masking = ""                     # masks for the masked test set; empty: the strategy the run used
device = "auto"                  # auto = cuda, then mps, then cpu
eval_batch_size = 1000           # images per forward pass
group_csv = ""                   # optional CSV of group labels for ImageFolder test images (columns: path, group)
group_column = "group"           # the CSV column holding the group (or spurious attribute)

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
own_groups = read_group_csv(group_csv, group_column, test_set, run_config["data_dir"]) if group_csv else None

test_sets = spurious_test_sets(test_set, run_config) if run_config.get("spurious_ratio", 0) > 0 else {"clean": test_set}
logits, masked_logits, masked_fraction = {}, {}, {}
for set_name, s in test_sets.items():  # every model on each test set, clean and masked by the ERM model
    images = s.images.to(device_)
    masks = compute_masks(models["initial"], images, strategy, batch_size=eval_batch_size, device=device_,
                          attention_quantile=run_config["attention_quantile"], num_std=run_config["mask_std"], **norm)
    masked = apply_masks(images, masks, run_config["masked_pixel_scale"])
    masked_fraction[set_name] = masks.float().mean().item()
    for name, m in models.items():
        logits[set_name, name] = predict(m, images, batch_size=eval_batch_size, device=device_, **norm)
        masked_logits[set_name, name] = predict(m, masked, batch_size=eval_batch_size, device=device_, **norm)

labels = test_set.labels
names = list(models)
results = {}
for name in names:
    prediction, masked_prediction = logits["clean", name].argmax(1), masked_logits["clean", name].argmax(1)
    results[name] = {
        "test_accuracy": (prediction == labels).float().mean().item(),
        "per_class_accuracy": dict(zip(classes, per_class_accuracy(prediction, labels, len(classes)))),
        "masked_test_accuracy": (masked_prediction == labels).float().mean().item(),
        "masked_per_class_accuracy": dict(zip(classes, per_class_accuracy(masked_prediction, labels, len(classes)))),
    }
    if len(test_sets) > 1:  # spurious patch: accuracy per test set, and groups (class, patch colour)
        spurious = {f"{k}_accuracy": (logits[k, name].argmax(1) == labels).float().mean().item() for k in test_sets}
        shifted = [k for k in test_sets if k != "clean"]
        correct = torch.cat([logits[k, name].argmax(1) == labels for k in shifted])
        groups = [(classes[int(y)], classes[int(p)]) for k in shifted for y, p in zip(labels, test_sets[k].patch_class)]
        g = group_accuracy(correct, [f"class={y},patch={p}" for y, p in groups])
        spurious.update(worst_group_accuracy=g["worst_group_accuracy"], average_group_accuracy=g["average_group_accuracy"])
        results[name]["spurious"] = spurious
        results[name]["groups"] = g
    if group_csv:  # a researcher's own group labels for the test images
        g = group_accuracy(logits["clean", name].argmax(1) == labels, own_groups)
        results[name]["own_groups"] = g
        results[name].setdefault("spurious", {}).update(
            own_worst_group_accuracy=g["worst_group_accuracy"], own_average_group_accuracy=g["average_group_accuracy"])

width = max(10, *(len(c) for c in classes)) + 2
print(f"\n{'class':<{width}}" + "".join(f"{RUN_MODELS[n]:>21}" for n in names))
for c in classes:
    print(f"{c:<{width}}" + "".join(f"{100 * results[n]['per_class_accuracy'][c]:>20.2f}%" for n in names))
print(f"{'total (clean)':<{width}}" + "".join(f"{100 * results[n]['test_accuracy']:>20.2f}%" for n in names))
print(f"{'total (masked)':<{width}}" + "".join(f"{100 * results[n]['masked_test_accuracy']:>20.2f}%" for n in names))
for key in results[names[0]].get("spurious", {}):
    label = key.replace("_accuracy", "")
    print(f"{label:<{width}}" + "".join(f"{100 * results[n]['spurious'][key]:>20.2f}%" for n in names))
print(f"masked test set: {strategy} masks from the ERM model, {100 * masked_fraction['clean']:.2f}% of pixels")

with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump({"models": {RUN_MODELS[n]: results[n] for n in names}, "masking": strategy,
               "masked_fraction_test": masked_fraction, "run_config": run_config,
               "checkpoint_epochs": {n: states[n]["epoch"] for n in names}}, f, indent=1)
with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    columns = ["test_set", "index", "path", "label", "patch_class"]
    for n in names:
        columns += [f"prediction_{n}", f"confidence_{n}", f"prediction_{n}_masked", f"confidence_{n}_masked"]
    writer.writerow(columns + (["group"] if group_csv else []))
    for set_name, s in test_sets.items():
        probs = {n: logits[set_name, n].softmax(1).max(1) for n in names}
        masked_probs = {n: masked_logits[set_name, n].softmax(1).max(1) for n in names}
        for i in range(len(s)):
            row = [set_name, int(s.indices[i]), s.paths[i] if s.paths else "", int(labels[i]),
                   int(s.patch_class[i]) if s.patch_class is not None else -1]
            for n in names:
                row += [int(probs[n].indices[i]), f"{probs[n].values[i]:.6f}",
                        int(masked_probs[n].indices[i]), f"{masked_probs[n].values[i]:.6f}"]
            writer.writerow(row + ([own_groups[i]] if group_csv else []))
if "conflicting" in test_sets:  # did attention move off the patch? image, ERM and MaskTune heatmaps
    pick = torch.arange(0, len(test_set), max(1, len(test_set) // 8))[:8]
    images = test_sets["conflicting"].images[pick].to(device_)
    heatmaps = {RUN_MODELS[n]: saliency_mask(models[n], normalize(images, **norm), strategy,
                                              run_config["attention_quantile"], run_config["mask_std"])[0].detach()
                for n in ("initial", "finetuned")}
    save_heatmap_comparison(os.path.join(out_dir, "conflicting_heatmaps.png"), images, heatmaps,
                            [f"{classes[int(labels[i])]} / patch {classes[int(test_sets['conflicting'].patch_class[i])]}"
                             for i in pick])
save_grouped_bars(os.path.join(out_dir, "per_class_accuracy.png"), classes,
                  {RUN_MODELS[n]: [100 * results[n]["per_class_accuracy"][c] for c in classes] for n in names})
print(f"wrote metrics.json, predictions.csv and per_class_accuracy.png to {out_dir}/")
