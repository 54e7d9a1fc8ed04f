"""Selective classification with a resnet50.py run (multi-label CelebA attributes).

1. The report's image-level rule, fixed: accept an image when ERM and the fine-tuned model agree on every
   attribute and the fine-tuned model is confident on every one (min over attributes of max(p, 1 - p) >=
   confidence_threshold; the report's code used the largest attribute probability, which says nothing
   about the other attributes). Rates are over all test images.
2. The per-attribute rule: abstain on an attribute where the models disagree or the confidence is low;
   accuracy on accepted decisions, coverage, rejection and agreement rates, overall and per attribute.
3. Scorers over all (image, attribute) decisions: risk-coverage curves, AURC, accuracy at target coverages
   with thresholds chosen on the validation split.

    python selective_classification_resnet.py
    python selective_classification_resnet.py --confidence_threshold=0.9

Writes to out_dir: selective.json, selective.csv, risk_coverage.png.
"""
import csv
import json
import os

import torch

from checkpoint import RUN_MODELS, load_run
from config import check, configure, ensure_writable_dir, pick_device
from data import load_celeba
from engine import predict
from metrics import compare_scorers, format_scorer_table, multilabel_scorers
from models import IMAGENET_MEAN, IMAGENET_STD, AttentionMaskingResNet50, ResNet50
from plots import save_risk_coverage

checkpoint_dir = "checkpoints"             # where resnet50.py wrote its checkpoints
out_dir = "out/selective_resnet"           # selective.json, selective.csv, risk_coverage.png
data_dir = ""                              # empty: the data_dir stored in the checkpoints
device = "auto"                            # auto = cuda, then mps, then cpu
eval_batch_size = 128                      # images per forward pass
confidence_threshold = 0.6                 # the report's threshold
target_coverages = [0.8, 0.85, 0.9, 0.95, 1.0]  # coverages whose thresholds are chosen on validation data

config = configure(globals())
check(0 <= confidence_threshold <= 1, "confidence_threshold must be in [0, 1]")
check(target_coverages and all(0 < c <= 1 for c in target_coverages), "target_coverages must lie in (0, 1]")
check(eval_batch_size > 0, "eval_batch_size must be positive")
ensure_writable_dir(out_dir)
device_ = pick_device(device)
norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
RESNETS = {"ResNet50": ResNet50, "AttentionMaskingResNet50": AttentionMaskingResNet50}

models, states = load_run(checkpoint_dir, "resnet50", lambda s: RESNETS.get(s["architecture"], ResNet50)(s["num_classes"]),
                          device_)
rc = dict(states["finetuned"]["config"], **({"data_dir": data_dir} if data_dir else {}))
splits = load_celeba(rc["data_dir"], rc["target_attributes"], rc["spurious_attribute"], rc["image_size"],
                     rc["subset_size"], rc["eval_subset_size"], rc["seed"], rc.get("decode_workers", 8),
                     rc.get("cache_dir", ""))
names = rc["target_attributes"]


def probabilities(images: torch.Tensor) -> dict:
    return {n: predict(m, images, batch_size=eval_batch_size, device=device_, **norm).sigmoid() for n, m in models.items()}


val_p, test_p = probabilities(splits["val"].images), probabilities(splits["test"].images)
labels = splits["test"].labels.bool()
tuned = [n for n in models if n != "initial"]

rules = {}
for n in tuned:
    pred_i, pred_t = test_p["initial"] > 0.5, test_p[n] > 0.5
    conf_t = torch.maximum(test_p[n], 1 - test_p[n])
    agree = pred_i == pred_t
    accept_image = agree.all(1) & (conf_t.min(1).values >= confidence_threshold)
    accept = agree & (conf_t >= confidence_threshold)
    correct = pred_t == labels
    k = int(accept_image.sum())
    rules[RUN_MODELS[n]] = {
        "image_rule": {"coverage": k / len(labels), "rejection_rate": 1 - k / len(labels),
                       "agreement_rate": agree.all(1).float().mean().item(),
                       "exact_match_on_accepted": correct.all(1)[accept_image].float().mean().item() if k else float("nan"),
                       "attribute_accuracy_on_accepted": correct[accept_image].float().mean().item() if k else float("nan")},
        "attribute_rule": {"coverage": accept.float().mean().item(), "rejection_rate": 1 - accept.float().mean().item(),
                           "agreement_rate": agree.float().mean().item(),
                           "accuracy_on_accepted": correct[accept].float().mean().item() if accept.any() else float("nan"),
                           "per_attribute": {a: {"coverage": accept[:, i].float().mean().item(),
                                                 "agreement_rate": agree[:, i].float().mean().item(),
                                                 "accuracy_on_accepted": correct[accept[:, i], i].float().mean().item()
                                                 if accept[:, i].any() else float("nan")}
                                             for i, a in enumerate(names)}},
    }
print(f"\nrules at confidence {confidence_threshold}, over all {len(labels)} test images / decisions")
print(f"{'ERM +':<22}{'image rule: exact match':>25}{'coverage':>10}{'attribute rule: acc':>21}{'coverage':>10}{'agreement':>11}")
for name, r in rules.items():
    i, a = r["image_rule"], r["attribute_rule"]
    print(f"{name:<22}{100 * i['exact_match_on_accepted']:>24.2f}%{100 * i['coverage']:>9.2f}%"
          f"{100 * a['accuracy_on_accepted']:>20.2f}%{100 * a['coverage']:>9.2f}%{100 * a['agreement_rate']:>10.2f}%")

sr = lambda p: (torch.maximum(p, 1 - p).flatten(), (p > 0.5).long().flatten())  # noqa: E731
scorers_val, scorers_test = {"SR ERM": sr(val_p["initial"])}, {"SR ERM": sr(test_p["initial"])}
for n in tuned:
    scorers_val.update(multilabel_scorers(val_p["initial"], val_p[n], RUN_MODELS[n]))
    scorers_test.update(multilabel_scorers(test_p["initial"], test_p[n], RUN_MODELS[n]))
table, curves = compare_scorers(scorers_test, scorers_val, labels.long().flatten(),
                                (test_p["finetuned"] > 0.5).long().flatten(), target_coverages)
print("\nscorers over all (image, attribute) decisions; thresholds chosen on the validation split")
print(format_scorer_table(table, target_coverages, "scorer (per attribute decision)"))
with open(os.path.join(out_dir, "selective.json"), "w") as f:
    json.dump({"rules": rules, "scorers": table, "config": config, "run_config": rc}, f, indent=1)
with open(os.path.join(out_dir, "selective.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
save_risk_coverage(os.path.join(out_dir, "risk_coverage.png"), curves)
print(f"wrote selective.json, selective.csv and risk_coverage.png to {out_dir}/")
