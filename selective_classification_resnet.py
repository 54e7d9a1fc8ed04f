"""Selective classification with a resnet50.py run: abstain unless the models are confident enough.

Single-label data (Waterbirds, image folders): the scorers of selective_classification_vgg.py (the
report's agreement rule without class weights, the paper's combined score, each model's softmax response),
with risk-coverage curves, AURC and accuracy at target coverages (thresholds chosen on validation data).
CelebA attributes (multi-label):
1. The report's image-level rule, fixed: accept an image when ERM and the fine-tuned model agree on every
   attribute and the fine-tuned model is confident on every one (min over attributes of max(p, 1 - p) >=
   confidence_threshold; the report's code used the largest attribute probability, which says nothing
   about the other attributes). Rates are over all test images.
2. The per-attribute rule: abstain on an attribute where the models disagree or the confidence is low.
3. The scorers over all (image, attribute) decisions.

    python selective_classification_resnet.py
    python selective_classification_resnet.py config/waterbirds.py --confidence_threshold=0.9

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
from masktune.selective import (
    agreement_rule,
    classification_scorers,
    compare_scorers,
    format_scorer_table,
    multilabel_agreement_rule,
    multilabel_scorers,
)
from models import AttentionMaskingResNet50, ResNet50

checkpoint_dir = "checkpoints"  # where resnet50.py wrote its checkpoints
out_dir = "out/resnet50"  # selective.json, selective.csv, risk_coverage.png
data_dir = ""  # empty: the data_dir stored in the checkpoints (set it when the data has moved)
device = "auto"  # auto = cuda, then mps, then cpu
eval_batch_size = 128  # images per forward pass
confidence_threshold = 0.6  # the report's threshold
target_coverages = [0.8, 0.85, 0.9, 0.95, 1.0]  # coverages whose thresholds are chosen on validation data

config, claims = configure(globals(), run_settings=True)
check(0 <= confidence_threshold <= 1, "confidence_threshold must be in [0, 1]")
check(target_coverages and all(0 < c <= 1 for c in target_coverages), "target_coverages must lie in (0, 1]")
check(eval_batch_size > 0, "eval_batch_size must be positive")
architectures = (ResNet50, AttentionMaskingResNet50)
device_, models, _, run = load_run_as_trained(config, claims, "resnet50", architectures)
_, val_set, test_set = experiment_data(run, fallback="")
multilabel = test_set.labels.is_floating_point()
tuned = [n for n in models if n != "initial"]


def outputs(images: torch.Tensor) -> dict:
    """Every model's probabilities: sigmoid per attribute, or logits for single-label data."""
    raw = predict_all(models, images, batch_size=eval_batch_size, amp=run.get("amp", False))
    return {n: z.sigmoid() for n, z in raw.items()} if multilabel else raw


val_out, test_out = outputs(val_set.images), outputs(test_set.images)
rules = {}
if multilabel:
    labels = test_set.labels.bool()
    for n in tuned:
        rules[RUN_MODELS[n]] = multilabel_agreement_rule(
            test_out["initial"], test_out[n], labels, confidence_threshold, test_set.classes
        )
    print(f"\nrules at confidence {confidence_threshold}, over all {len(labels)} test images / decisions")
    header = f"{'image rule: exact match':>25}{'coverage':>10}{'attribute rule: acc':>21}{'coverage':>10}"
    print(f"{'ERM +':<22}{header}")
    for name, r in rules.items():
        i, a = r["image_rule"], r["attribute_rule"]
        print(
            f"{name:<22}{100 * i['exact_match_on_accepted']:>24.2f}%{100 * i['coverage']:>9.2f}%"
            f"{100 * a['accuracy_on_accepted']:>20.2f}%{100 * a['coverage']:>9.2f}%"
        )

    def sr(p):  # softmax response of each attribute decision
        return torch.maximum(p, 1 - p).flatten(), (p > 0.5).long().flatten()

    scorers_val, scorers_test = {"SR ERM": sr(val_out["initial"])}, {"SR ERM": sr(test_out["initial"])}
    for n in tuned:
        scorers_val.update(multilabel_scorers(val_out["initial"], val_out[n], RUN_MODELS[n]))
        scorers_test.update(multilabel_scorers(test_out["initial"], test_out[n], RUN_MODELS[n]))
    flat_labels, oracle = labels.long().flatten(), (test_out["finetuned"] > 0.5).long().flatten()
else:
    labels, no_weights = test_set.labels, torch.ones(len(test_set.classes))
    for n in tuned:
        conf, pred = test_out[n].softmax(1).max(1)
        rules[RUN_MODELS[n]] = agreement_rule(
            test_out["initial"].argmax(1), pred, conf, labels, confidence_threshold, no_weights
        )
        rule = rules[RUN_MODELS[n]]
        print(
            f"the report's rule, ERM + {RUN_MODELS[n]}: {100 * rule['accuracy_on_accepted']:.2f}% "
            f"on accepted, coverage {100 * rule['coverage']:.2f}%"
        )
    scorers_val = {"SR ERM": tuple(val_out["initial"].softmax(1).max(1))}
    scorers_test = {"SR ERM": tuple(test_out["initial"].softmax(1).max(1))}
    for n in tuned:
        scorers_val.update(classification_scorers(val_out["initial"], val_out[n], no_weights, RUN_MODELS[n]))
        scorers_test.update(
            classification_scorers(test_out["initial"], test_out[n], no_weights, RUN_MODELS[n])
        )
    flat_labels, oracle = labels, test_out["finetuned"].argmax(1)

table, curves = compare_scorers(scorers_test, scorers_val, flat_labels, oracle, target_coverages)
print(
    "\nscorers; thresholds chosen on the validation split"
    + (" (per attribute decision)" if multilabel else "")
)
print(format_scorer_table(table, target_coverages))
with open(os.path.join(out_dir, "selective.json"), "w") as f:
    json.dump({"rules": rules, "scorers": table, "config": config, "run_config": run}, f, indent=1)
with open(os.path.join(out_dir, "selective.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
save_risk_coverage(os.path.join(out_dir, "risk_coverage.png"), curves)
print(f"wrote selective.json, selective.csv and risk_coverage.png to {out_dir}/")
