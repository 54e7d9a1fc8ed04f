"""Accuracy metrics: per class, per group (worst, average, weighted by the training groups), per CelebA
attribute, mean +/- std over seeds; and the evaluation table of a run's models on a test set. Inputs are
plain tensors; outputs plain floats."""

import csv
import math

import torch

from masktune.checkpoint import RUN_MODELS
from masktune.images import ImageSet


def per_class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy within each true class (nan for a class with no samples)."""
    out = []
    for c in range(num_classes):
        in_class = labels == c
        n = int(in_class.sum())
        out.append((predictions[in_class] == c).float().mean().item() if n else float("nan"))
    return out


def group_accuracy(correct: torch.Tensor, groups: list, train_groups: list | None = None) -> dict:
    """Accuracy per group, their plain average, and the worst group (min over groups). With the training
    images' groups, also the average weighted by their proportions in training (Waterbirds' convention),
    over the groups present in both."""
    per_group = {}
    for g in sorted(set(groups), key=str):
        index = torch.tensor([x == g for x in groups])
        per_group[str(g)] = correct[index].float().mean().item()
    out = {
        "per_group": per_group,
        "group_count": {str(g): groups.count(g) for g in sorted(set(groups), key=str)},
        "average_group_accuracy": sum(per_group.values()) / max(len(per_group), 1),
        "worst_group_accuracy": min(per_group.values()) if per_group else float("nan"),
        "worst_group": min(per_group, key=per_group.get) if per_group else None,
    }
    if train_groups is not None:
        weights = {g: train_groups.count(g) for g in per_group if g in train_groups}
        total = sum(weights.values())
        out["weighted_average_accuracy"] = (
            sum(w * per_group[g] for g, w in weights.items()) / total if total else float("nan")
        )
    return out


def attribute_metrics(predicted: torch.Tensor, labels: torch.Tensor, names: list[str]) -> dict:
    """Per-attribute accuracy, precision, recall and F1 of 0/1 predictions (N, A), and their means."""
    predicted, labels = predicted.bool(), labels.bool()
    out = {}
    for a, name in enumerate(names):
        p, y = predicted[:, a], labels[:, a]
        tp, fp, fn = (p & y).sum().item(), (p & ~y).sum().item(), (~p & y).sum().item()
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        out[name] = {
            "accuracy": (p == y).float().mean().item(),
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        }
    means = {
        f"mean_{k}": sum(m[k] for m in out.values()) / len(out)
        for k in ("accuracy", "precision", "recall", "f1")
    }
    return {"per_attribute": out, **means}


def attribute_group_accuracy(
    predicted: torch.Tensor,
    labels: torch.Tensor,
    spurious: torch.Tensor,
    names: list[str],
    spurious_name: str,
) -> dict:
    """For each attribute: accuracy in the 4 groups (attribute value, spurious attribute), the worst group."""
    out = {}
    for a, name in enumerate(names):
        correct = predicted[:, a].bool() == labels[:, a].bool()
        groups = [
            f"{name}={int(y)},{spurious_name}={int(s)}"
            for y, s in zip(labels[:, a].tolist(), spurious.tolist())
        ]
        out[name] = group_accuracy(correct, groups)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def evaluate_predictions(logits: dict, test: ImageSet, train: ImageSet) -> dict:
    """Every model's test metrics, by its name in ``RUN_MODELS``: accuracy (CelebA: per attribute, with
    precision, recall and F1) and, where the test images' spurious attribute is known, per-group,
    worst-group and average-group accuracy (and the average weighted by the training groups)."""
    results = {}
    for name, z in logits.items():
        if test.labels.is_floating_point():  # 0/1 attributes: groups (attribute, spurious attribute)
            predicted = z > 0
            r = attribute_metrics(predicted, test.labels, test.classes)
            r["groups"] = attribute_group_accuracy(
                predicted, test.labels, test.spurious, test.classes, test.spurious_names[1]
            )
            if len(test.classes) == 1:  # one target attribute: its groups are the benchmark's
                r["worst_group_accuracy"] = r["groups"][test.classes[0]]["worst_group_accuracy"]
                r["average_group_accuracy"] = r["groups"][test.classes[0]]["average_group_accuracy"]
        else:
            prediction = z.argmax(1)
            r = {
                "accuracy": (prediction == test.labels).float().mean().item(),
                "per_class_accuracy": dict(
                    zip(test.classes, per_class_accuracy(prediction, test.labels, len(test.classes)))
                ),
            }
            if test.spurious is not None:
                known = (test.spurious >= 0).tolist()
                groups = group_accuracy(
                    (prediction == test.labels)[torch.tensor(known)],
                    [g for g, k in zip(test.groups(), known) if k],
                    train.groups() if train.spurious is not None else None,
                )
                r.update({k: v for k, v in groups.items() if k.endswith("accuracy")}, groups=groups)
        results[RUN_MODELS[name]] = r
    return results


def format_evaluation(results: dict, test: ImageSet) -> str:
    """The models side by side: accuracies and group metrics, one row each."""
    names = list(results)
    lines = [f"\n{'test':<28}" + "".join(f"{n:>21}" for n in names)]
    if test.labels.is_floating_point():
        for a in test.classes:
            lines.append(
                f"{a + ' (acc / worst group)':<28}"
                + "".join(
                    f"{100 * results[n]['per_attribute'][a]['accuracy']:>12.2f} / "
                    f"{100 * results[n]['groups'][a]['worst_group_accuracy']:>5.1f}"
                    for n in names
                )
            )
    keys = [k for k, v in results[names[0]].items() if k.endswith("accuracy") and isinstance(v, float)]
    for key in keys + [k for k in ("mean_precision", "mean_recall", "mean_f1") if k in results[names[0]]]:
        lines.append(
            f"{key.replace('_', ' '):<28}" + "".join(f"{100 * results[n][key]:>20.2f}%" for n in names)
        )
    if "groups" in results[names[0]] and not test.labels.is_floating_point():
        for group in results[names[0]]["groups"]["per_group"]:
            lines.append(
                f"{'  ' + group:<28}"
                + "".join(f"{100 * results[n]['groups']['per_group'][group]:>20.2f}%" for n in names)
            )
    return "\n".join(lines)


def shortcut_metrics(correct: dict[str, torch.Tensor], sets: dict[str, ImageSet], prefix: str = "") -> dict:
    """A model on a planted shortcut's evaluation sets (``correct``: each set's right predictions): the
    accuracy on each set, and the (class, marker) groups of the aligned and conflicting sets together."""
    shifted = [k for k in sets if k != "clean"]
    groups = group_accuracy(
        torch.cat([correct[k] for k in shifted]), [g for k in shifted for g in sets[k].groups()]
    )
    return {
        **{f"{prefix}{k}_accuracy": c.float().mean().item() for k, c in correct.items()},
        f"{prefix}worst_group_accuracy": groups["worst_group_accuracy"],
        f"{prefix}average_group_accuracy": groups["average_group_accuracy"],
        f"{prefix}groups": groups,
    }


def write_predictions(path: str, logits: dict[str, dict], sets: dict[str, ImageSet]) -> None:
    """One row per image of each test set (``logits[set][model]``: that model's outputs on it): the set, the
    image's index, file, spurious attribute, label(s), and every model's outputs (class prediction and
    confidence, or each attribute's probability)."""
    first = next(iter(sets.values()))
    multilabel = first.labels.is_floating_point()
    models = list(next(iter(logits.values())))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if multilabel:
            columns = [
                *[f"label_{a}" for a in first.classes],
                *[f"probability_{n}_{a}" for n in models for a in first.classes],
            ]
        else:
            columns = ["label", *[f"{kind}_{n}" for n in models for kind in ("prediction", "confidence")]]
        writer.writerow(["test_set", "index", "path", "spurious", *columns])
        for set_name, test in sets.items():
            z = logits[set_name]
            outputs = {n: z[n].sigmoid() if multilabel else z[n].softmax(1).max(1) for n in models}
            spurious = test.spurious.tolist() if test.spurious is not None else [-1] * len(test)
            for i in range(len(test)):
                row = [set_name, int(test.indices[i]), test.paths[i] if test.paths else "", spurious[i]]
                if multilabel:
                    row += [int(v) for v in test.labels[i].tolist()]
                    row += [f"{outputs[n][i, a]:.6f}" for n in models for a in range(len(test.classes))]
                else:
                    row += [int(test.labels[i])]
                    row += [
                        v for n in models for v in (int(outputs[n].indices[i]), f"{outputs[n].values[i]:.6f}")
                    ]
                writer.writerow(row)
