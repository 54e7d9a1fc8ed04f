"""Selective classification with a vgg.py run: abstain unless the models are confident enough.

1. The report's rule (accept when ERM and the fine-tuned model agree and the fine-tuned model's confidence
   >= confidence_threshold x class weight), with rates over ALL test samples.
2. Scorers compared at every coverage: the agreement rule, the MaskTune paper's score
   max softmax(softmax(z_erm) * softmax(z_tuned)), and the softmax response of each model alone; the oracle
   as a bound. Risk-coverage curves, AURC, and accuracy at target coverages with the threshold chosen on the
   run's validation split (the paper's protocol), reporting the test coverage actually reached.
The controls (no-mask, random-mask fine-tunes), when trained, are scored the same way beside MaskTune.

    python selective_classification_vgg.py
    python selective_classification_vgg.py --confidence_threshold=0.9 --target_coverages=[0.9,0.95]

Writes to out_dir: selective.json, selective.csv, risk_coverage.png.
"""

import csv
import json
import os

import torch

from masktune.checkpoint import RUN_MODELS, load_run_as_trained
from masktune.console import check
from masktune.datasets import experiment_data
from masktune.engine import predict_all
from masktune.plots import save_risk_coverage
from masktune.recipes import configure
from masktune.selective import agreement_rule, classification_scorers, compare_scorers, format_scorer_table
from models import VGGWithAttention

checkpoint_dir = "checkpoints"  # where vgg.py wrote its checkpoints
out_dir = "out/vgg"  # selective.json, selective.csv, risk_coverage.png
data_dir = ""  # empty: the data_dir stored in the checkpoints
device = "auto"  # auto = cuda, then mps, then cpu
eval_batch_size = 1000  # images per forward pass
confidence_threshold = 0.8  # the report's threshold on the fine-tuned model's confidence
difficult_classes = ["bird", "cat", "deer", "dog"]  # the report's hard CIFAR-10 classes (those present count)
difficult_class_weight = 0.7  # their threshold is multiplied by this
target_coverages = [0.8, 0.85, 0.9, 0.95, 1.0]  # coverages whose thresholds are chosen on validation data

config, claims = configure(globals(), run_settings=True)
check(0 <= confidence_threshold <= 1, "confidence_threshold must be in [0, 1]")
check(difficult_class_weight > 0, "difficult_class_weight must be positive")
check(all(0 < c <= 1 for c in target_coverages) and target_coverages, "target_coverages must lie in (0, 1]")
check(eval_batch_size > 0, "eval_batch_size must be positive")
device_, models, _, run_config = load_run_as_trained(config, claims, "vgg", (VGGWithAttention,))
_, val_set, test_set = experiment_data(run_config)
classes = test_set.classes
weighted = [c for c in difficult_classes if c in classes]
if not weighted:
    print(f"difficult_classes: none of {difficult_classes} is a class of this data: the rule runs unweighted")
class_weights = torch.tensor([difficult_class_weight if c in weighted else 1.0 for c in classes])


def all_logits(images: torch.Tensor) -> dict:
    return predict_all(models, images, batch_size=eval_batch_size, amp=run_config.get("amp", False))


val_logits, test_logits = all_logits(val_set.images), all_logits(test_set.images)
labels, val_labels = test_set.labels, val_set.labels

# 1. the report's rule, per fine-tuned model ---------------------------------------------------------
tuned = [n for n in models if n != "initial"]
rule = {}
for n in tuned:
    conf, pred = test_logits[n].softmax(1).max(1)
    rule[RUN_MODELS[n]] = agreement_rule(
        test_logits["initial"].argmax(1), pred, conf, labels, confidence_threshold, class_weights
    )
print(
    f"\nthe report's rule (threshold {confidence_threshold}, weight {difficult_class_weight} for "
    f"{', '.join(weighted) or 'no class'}); rates over all {len(labels)} test images"
)
print(
    f"{'ERM +':<22}{'acc accepted':>14}{'coverage':>10}{'rejection':>11}{'agreement':>11}{'report rej.':>13}"
)
for name, r in rule.items():
    print(
        f"{name:<22}{100 * r['accuracy_on_accepted']:>13.2f}%{100 * r['coverage']:>9.2f}%"
        f"{100 * r['rejection_rate']:>10.2f}%{100 * r['agreement_rate']:>10.2f}%"
        f"{100 * r['report_rejection_rate']:>12.2f}%"
    )

# 2. scorers at every coverage -------------------------------------------------------------------
scorers_val = {f"SR {RUN_MODELS['initial']}": tuple(val_logits["initial"].softmax(1).max(1))}
scorers_test = {f"SR {RUN_MODELS['initial']}": tuple(test_logits["initial"].softmax(1).max(1))}
for n in tuned:
    scorers_val.update(
        classification_scorers(val_logits["initial"], val_logits[n], class_weights, RUN_MODELS[n])
    )
    scorers_test.update(
        classification_scorers(test_logits["initial"], test_logits[n], class_weights, RUN_MODELS[n])
    )

table, curves = compare_scorers(
    scorers_test, scorers_val, labels, test_logits["finetuned"].argmax(1), target_coverages
)
print(
    f"\nrisk-coverage: thresholds chosen on the {len(val_labels)} validation images; "
    "test accuracy on accepted (test coverage reached)"
)
print(format_scorer_table(table, target_coverages))

with open(os.path.join(out_dir, "selective.json"), "w") as f:
    json.dump(
        {"report_rule": rule, "scorers": table, "config": config, "run_config": run_config}, f, indent=1
    )
with open(os.path.join(out_dir, "selective.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
save_risk_coverage(
    os.path.join(out_dir, "risk_coverage.png"),
    {k: v for k, v in curves.items() if not k.startswith("agreement") or "MaskTune" in k},
)
print(f"wrote selective.json, selective.csv and risk_coverage.png to {out_dir}/")
