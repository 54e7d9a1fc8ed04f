"""Selective classification: abstain unless confident. The report's agreement rule, scorers (the paper's
combined score, softmax response), risk-coverage curves, AURC, and thresholds chosen on validation data for
target coverages. Inputs are plain tensors; outputs plain floats."""

import math

import torch


def agreement_rule(
    pred_initial: torch.Tensor,
    pred_finetuned: torch.Tensor,
    conf_finetuned: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    class_weights: torch.Tensor,
) -> dict:
    """The report's selective rule: accept when both models predict the same class and the fine-tuned
    model's confidence >= threshold * weight[predicted class].

    Rates are over ALL samples (disagreements count as rejections). ``report_*`` repeat the report's own
    definitions for comparison: its rejection rate counted only samples on which the models agreed.
    """
    n = len(labels)
    agree = pred_initial == pred_finetuned
    confident = conf_finetuned >= threshold * class_weights[pred_finetuned]
    accepted = agree & confident
    correct = pred_finetuned == labels
    n_acc, n_agree = int(accepted.sum()), int(agree.sum())
    return {
        "accuracy_on_accepted": correct[accepted].float().mean().item() if n_acc else float("nan"),
        "coverage": n_acc / n,
        "rejection_rate": 1 - n_acc / n,
        "agreement_rate": n_agree / n,
        "accepted": n_acc,
        "total": n,
        "report_rejection_rate": (n_agree - n_acc) / n_agree if n_agree else float("nan"),
    }


def multilabel_agreement_rule(
    p_initial: torch.Tensor, p_tuned: torch.Tensor, labels: torch.Tensor, threshold: float, names: list[str]
) -> dict:
    """The report's rule for 0/1 attributes, from the two models' probabilities (N, A): per image, accept
    when the models agree on every attribute and the tuned model's least confident decision is >=
    ``threshold`` (exact match on accepted); per attribute decision, accept where they agree and the tuned
    model's confidence in it is >= ``threshold``. Rates are over all images or decisions."""
    pred_initial, pred_tuned = p_initial > 0.5, p_tuned > 0.5
    confidence = torch.maximum(p_tuned, 1 - p_tuned)
    agree, correct = pred_initial == pred_tuned, pred_tuned == labels.bool()
    accept_image = agree.all(1) & (confidence.min(1).values >= threshold)
    accept = agree & (confidence >= threshold)

    def rate_on(values: torch.Tensor, where: torch.Tensor) -> float:
        return values[where].float().mean().item() if where.any() else float("nan")

    return {
        "image_rule": {
            "coverage": accept_image.float().mean().item(),
            "agreement_rate": agree.all(1).float().mean().item(),
            "exact_match_on_accepted": rate_on(correct.all(1), accept_image),
        },
        "attribute_rule": {
            "coverage": accept.float().mean().item(),
            "agreement_rate": agree.float().mean().item(),
            "accuracy_on_accepted": rate_on(correct, accept),
            "per_attribute": {
                a: {
                    "coverage": accept[:, i].float().mean().item(),
                    "accuracy_on_accepted": rate_on(correct[:, i], accept[:, i]),
                }
                for i, a in enumerate(names)
            },
        },
    }


def risk_coverage(scores: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage and risk (error on accepted) when accepting every sample with score >= each distinct score.

    Tied scores are accepted together, so the curve does not depend on the order of ties.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    s, errors = scores[order], (~correct[order].bool()).float()
    cum_errors = errors.cumsum(0)
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    count = torch.arange(1, len(s) + 1, dtype=torch.float)[last_of_tie]
    return count / len(s), cum_errors[last_of_tie] / count


def aurc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve: mean over samples of the risk at that sample's own score
    (Geifman et al.'s definition, with tied samples sharing the risk of their tie group)."""
    coverage, risk = risk_coverage(scores, correct)
    counts = torch.diff(torch.cat([torch.zeros(1), coverage * len(scores)]))
    return (risk * counts).sum().item() / len(scores)


def oracle_risk_coverage(correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best possible ordering (all correct samples first): coverage, risk and AURC."""
    n, n_correct = len(correct), int(correct.sum())
    k = torch.arange(1, n + 1, dtype=torch.float)
    risk = (k - n_correct).clamp_min(0) / k
    return k / n, risk, risk.mean().item()


def threshold_for_coverage(scores: torch.Tensor, target: float) -> float:
    """The largest threshold t with fraction(scores >= t) >= target (-inf for a target of 1)."""
    if target >= 1:
        return float("-inf")
    k = max(1, math.ceil(target * len(scores)))
    return torch.sort(scores, descending=True).values[k - 1].item()


def selective_at_threshold(scores: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict:
    accepted = scores >= threshold
    n_acc = int(accepted.sum())
    return {
        "coverage": n_acc / len(scores),
        "accuracy_on_accepted": correct[accepted].float().mean().item() if n_acc else float("nan"),
    }


def classification_scorers(
    logits_initial: torch.Tensor,
    logits_tuned: torch.Tensor,
    class_weights: torch.Tensor,
    tuned_name: str = "MaskTune",
) -> dict:
    """Selective-classification scorers for single-label logits: {name: (scores, predictions)}.

    agreement rule: agreements first, ranked by the tuned model's confidence / class weight (accepting
                    scores >= 1 + t is exactly the report's rule at threshold t)
    paper score:    max of softmax(softmax(z_erm) * softmax(z_tuned)), predicting its argmax
    SR <model>:     softmax response (max probability) of one model alone
    """
    p_initial, p_tuned = logits_initial.softmax(1), logits_tuned.softmax(1)
    conf_tuned, pred_tuned = p_tuned.max(1)
    agree = (p_initial.argmax(1) == pred_tuned).float()
    combined = (p_initial * p_tuned).softmax(1)
    return {
        f"agreement rule (ERM + {tuned_name})": (
            agree * 1e3 + conf_tuned / class_weights[pred_tuned],
            pred_tuned,
        ),
        f"paper score (ERM x {tuned_name})": tuple(combined.max(1)),
        f"SR {tuned_name}": (conf_tuned, pred_tuned),
    }


def multilabel_scorers(p_initial: torch.Tensor, p_tuned: torch.Tensor, tuned_name: str = "MaskTune") -> dict:
    """Per-(image, attribute) decision scorers from sigmoid probabilities (N, A): {name: (scores, 0/1
    predictions)}, flattened to N * A decisions: ``classification_scorers`` with two classes per attribute."""
    pair_i = torch.stack([1 - p_initial, p_initial], -1)
    pair_t = torch.stack([1 - p_tuned, p_tuned], -1)
    conf_t, pred_t = pair_t.max(-1)
    agree = (pair_i.argmax(-1) == pred_t).float()
    combined = (pair_i * pair_t).softmax(-1).max(-1)
    return {
        f"agreement rule (ERM + {tuned_name})": ((agree * 1e3 + conf_t).flatten(), pred_t.flatten()),
        f"paper score (ERM x {tuned_name})": (combined.values.flatten(), combined.indices.flatten()),
        f"SR {tuned_name}": (conf_t.flatten(), pred_t.flatten()),
    }


def compare_scorers(
    scorers_test: dict,
    scorers_val: dict,
    labels: torch.Tensor,
    oracle_predictions: torch.Tensor,
    target_coverages: list[float],
) -> tuple[list[dict], dict]:
    """Rows (AURC, and accuracy/coverage on test at thresholds chosen on validation for each target coverage)
    and risk-coverage curves for every scorer ``{name: (scores, predictions)}``, plus the oracle ordering of
    ``oracle_predictions``."""
    table, curves = [], {}
    for name, (scores, pred) in scorers_test.items():
        correct = pred == labels
        row = {
            "scorer": name,
            "aurc": aurc(scores, correct),
            "accuracy_at_full_coverage": correct.float().mean().item(),
        }
        for target in target_coverages:
            at = selective_at_threshold(scores, correct, threshold_for_coverage(scorers_val[name][0], target))
            row[f"accuracy@{target:g}"], row[f"coverage@{target:g}"] = (
                at["accuracy_on_accepted"],
                at["coverage"],
            )
        table.append(row)
        curves[name] = risk_coverage(scores, correct)
    oracle_correct = oracle_predictions == labels
    coverage, risk, oracle_aurc = oracle_risk_coverage(oracle_correct)
    curves["oracle"] = (coverage, risk)
    table.append(
        {
            "scorer": "oracle (MaskTune predictions)",
            "aurc": oracle_aurc,
            "accuracy_at_full_coverage": oracle_correct.float().mean().item(),
        }
    )
    return table, curves


def format_scorer_table(table: list[dict], target_coverages: list[float], title: str = "scorer") -> str:
    lines = [
        f"{title:<42}{'AURC x100':>10}"
        + "".join(f"{'@' + format(100 * t, 'g') + '%':>17}" for t in target_coverages)
    ]
    for row in table:
        cells = "".join(
            f"{100 * row[f'accuracy@{t:g}']:>8.2f}% ({100 * row[f'coverage@{t:g}']:>5.1f}%)"
            if f"accuracy@{t:g}" in row
            else f"{'':>17}"
            for t in target_coverages
        )
        lines.append(f"{row['scorer']:<42}{100 * row['aurc']:>10.3f}{cells}")
    return "\n".join(lines)
