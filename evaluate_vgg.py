"""Evaluate a vgg.py run: ERM, MaskTune and (when trained) the no-mask and random-mask controls, side by
side, on the clean test set and on the test set with the ERM model's masks blacked out; per class.

With a planted shortcut, also on the aligned and conflicting versions of the test and the validation
images (shortcuts.py), with group (class, marker) and worst-group accuracy; the validation numbers are the
ones to tune on. With group labels (Waterbirds, an image folder's group_csv), per-group, worst-group and
average-group accuracy, and the average weighted by the training groups' proportions.

Everything about the run (data, split, masking) is read from its checkpoints; the same recipe files and
flags as for vgg.py are accepted when they agree with the run, so one command line serves every script:

    python evaluate_vgg.py config/cifar_square.py --seed=1

Writes to out_dir: metrics.json, predictions.csv (a row per test image and test set), per_class_accuracy.png.
"""

import json
import os

import torch

from masktune.checkpoint import RUN_MODELS, load_run_as_trained
from masktune.console import check
from masktune.datasets import experiment_data
from masktune.engine import predict_all
from masktune.masking import compute_masks, fill_masks, mask_settings, other_class_partners
from masktune.metrics import group_accuracy, per_class_accuracy, write_predictions
from masktune.plots import save_grouped_bars
from masktune.recipes import configure
from masktune.seeds import stream
from masktune.shortcuts import planted_pixels, shortcut_evaluation
from models import VGGWithAttention

checkpoint_dir = "checkpoints"  # where vgg.py wrote vgg_initial.pt, vgg_finetuned.pt, ...
out_dir = "out/vgg"  # metrics.json, predictions.csv, per_class_accuracy.png
data_dir = ""  # empty: the data_dir stored in the checkpoints (set it when the data has moved)
device = "auto"  # auto = cuda, then mps, then cpu
eval_batch_size = 1000  # images per forward pass

config, claims = configure(globals(), run_settings=True)
check(eval_batch_size > 0, "eval_batch_size must be positive")
device_, models, states, run = load_run_as_trained(config, claims, "vgg", (VGGWithAttention,))
train_set, val_set, test_set = experiment_data(run)
classes, labels = test_set.classes, test_set.labels
check(len(classes) == models["initial"].num_classes, "the data's classes do not match the checkpoints")


def logits_of(images: torch.Tensor) -> dict:
    """Every model's logits, with the run's amp: as vgg.py evaluates."""
    return predict_all(models, images, batch_size=eval_batch_size, amp=run.get("amp", False))


# every model on the test set: clean, with the ERM model's masks blacked out, and with and against a shortcut
if run["shortcut"]:
    planted, test_sets, logits = shortcut_evaluation(logits_of, test_set, val_set, run)
else:
    planted, test_sets, logits = {}, {"clean": test_set}, {"clean": logits_of(test_set.images)}
if run["masking"] == "planted":  # the test images carry no planted marker: nothing to mask
    masks = planted_pixels(test_set)
else:
    masks = compute_masks(
        models["initial"],
        test_set.images,
        run["masking"],
        batch_size=eval_batch_size,
        partners=other_class_partners(labels, stream(run["seed"], "mask_partners")),
        amp=run.get("amp", False),
        **mask_settings(run),
    )
masked_logits = logits_of(fill_masks(test_set.images, masks, "black"))
val_logits = logits_of(val_set.images)  # the validation split as the run saw it (shortcut included)
results = {}
for name in models:
    prediction, masked_prediction = logits["clean"][name].argmax(1), masked_logits[name].argmax(1)
    results[name] = {
        "val_accuracy": (val_logits[name].argmax(1) == val_set.labels).float().mean().item(),
        "test_accuracy": (prediction == labels).float().mean().item(),
        "per_class_accuracy": dict(zip(classes, per_class_accuracy(prediction, labels, len(classes)))),
        "masked_test_accuracy": (masked_prediction == labels).float().mean().item(),
    }


if run["shortcut"]:  # aligned and conflicting test and validation sets (tune on the validation ones)
    for name in models:
        results[name].update(planted[name])
elif test_set.spurious is not None:  # group labels: Waterbirds, or an image folder's group_csv
    for name in models:
        groups = group_accuracy(
            logits["clean"][name].argmax(1) == labels,
            test_set.groups(),
            train_groups=train_set.groups() if train_set.spurious is not None else None,
        )
        results[name]["groups"] = groups
        results[name].update({k: v for k, v in groups.items() if k.endswith("accuracy")})

width = max(12, *(len(c) for c in classes)) + 2
names = list(models)
print(f"\n{'test accuracy':<{width}}" + "".join(f"{RUN_MODELS[n]:>21}" for n in names))
for c in classes:
    print(f"{c:<{width}}" + "".join(f"{100 * results[n]['per_class_accuracy'][c]:>20.2f}%" for n in names))
for key in [k for k, v in results["initial"].items() if k.endswith("accuracy") and isinstance(v, float)]:
    label = key.replace("_accuracy", "").replace("test", "total").replace("_", " ")
    print(f"{label:<{width}}" + "".join(f"{100 * results[n][key]:>20.2f}%" for n in names))
masked_share = 100 * masks.float().mean()
print(f"masked: {run['masking']} masks of the ERM model, blacked out, {masked_share:.2f}% of pixels")
if run["shortcut"]:
    print(
        "aligned / conflicting: the test images with their own class's / another class's marker; val ...: "
        "the same for the validation images (tune on these)"
    )

with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(
        {
            "models": {RUN_MODELS[n]: results[n] for n in names},
            "run_config": run,
            "masked_fraction_test": masks.float().mean().item(),
            "checkpoint_epochs": {n: states[n]["epoch"] for n in names},
        },
        f,
        indent=1,
    )
write_predictions(os.path.join(out_dir, "predictions.csv"), logits, test_sets)
save_grouped_bars(
    os.path.join(out_dir, "per_class_accuracy.png"),
    classes,
    {RUN_MODELS[n]: [100 * results[n]["per_class_accuracy"][c] for c in classes] for n in names},
)
print(f"wrote metrics.json, predictions.csv and per_class_accuracy.png to {out_dir}/")
