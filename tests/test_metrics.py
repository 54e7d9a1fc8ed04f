import math

import pytest
import torch

from masktune.metrics import (
    attribute_group_accuracy,
    attribute_metrics,
    group_accuracy,
    mean_std,
    per_class_accuracy,
)
from masktune.selective import (
    agreement_rule,
    aurc,
    classification_scorers,
    multilabel_agreement_rule,
    oracle_risk_coverage,
    risk_coverage,
    selective_at_threshold,
    threshold_for_coverage,
)


def test_per_class_accuracy():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0, 0])
    result = per_class_accuracy(preds, labels, 4)
    assert result[:3] == [0.5, pytest.approx(2 / 3), 0.0] and math.isnan(result[3])


def test_group_accuracy_and_worst_group():
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 1])
    groups = [("a", 0), ("a", 0), ("a", 0), ("b", 1), ("b", 1), ("c", 0), ("c", 0)]
    result = group_accuracy(correct, groups)
    assert result["per_group"] == {"('a', 0)": pytest.approx(2 / 3), "('b', 1)": 0.5, "('c', 0)": 0.5}
    assert result["worst_group_accuracy"] == 0.5
    assert result["average_group_accuracy"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 3)


def test_weighted_average_uses_the_training_groups_proportions():
    correct = torch.tensor([1, 0, 1, 1, 0, 0])  # groups a: 1/2, b: 2/2, c: 0/2
    groups = ["a", "a", "b", "b", "c", "c"]
    train = ["a"] * 6 + ["b"] * 3 + ["c"] * 1  # proportions 0.6, 0.3, 0.1
    out = group_accuracy(correct, groups, train)
    assert out["weighted_average_accuracy"] == pytest.approx(0.6 * 0.5 + 0.3 * 1.0 + 0.1 * 0.0)
    assert out["average_group_accuracy"] == pytest.approx(0.5) and out["worst_group"] == "c"


def test_agreement_rule_counts_disagreements_as_rejections():
    labels = torch.tensor([0, 1, 2, 3, 2])
    initial = torch.tensor([0, 1, 2, 0, 2])
    tuned = torch.tensor([0, 1, 2, 3, 1])  # sample 3 and 4: disagreement
    conf = torch.tensor([0.9, 0.7, 0.6, 0.99, 0.99])
    weights = torch.tensor([1.0, 1.0, 0.7, 0.7])  # class 2 accepted from 0.56
    r = agreement_rule(initial, tuned, conf, labels, 0.8, weights)
    # accepted: 0 (0.9 >= 0.8) and 2 (0.6 >= 0.56); 1 rejected (0.7 < 0.8); 3, 4 disagree
    assert r["accepted"] == 2 and r["coverage"] == 0.4 and r["rejection_rate"] == pytest.approx(0.6)
    assert r["agreement_rate"] == 0.6 and r["accuracy_on_accepted"] == 1.0
    assert r["report_rejection_rate"] == pytest.approx(1 / 3)


def test_risk_coverage_and_aurc_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, False])
    coverage, risk = risk_coverage(scores, correct)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.5])
    assert aurc(scores, correct) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_ties_are_accepted_together():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.5])
    correct = torch.tensor([True, True, False, False])
    coverage, risk = risk_coverage(scores, correct)
    assert coverage.tolist() == [0.25, 1.0] and risk.tolist() == pytest.approx([0.0, 0.5])
    assert aurc(scores, correct) == pytest.approx((0 + 3 * 0.5) / 4)
    # reordering tied samples changes nothing
    assert aurc(scores, correct[[0, 3, 2, 1]]) == pytest.approx(aurc(scores, correct))


@pytest.mark.parametrize("value, expected", [(True, 0.0), (False, 1.0)])
def test_all_correct_and_all_wrong(value, expected):
    scores = torch.rand(10)
    correct = torch.full((10,), value)
    assert aurc(scores, correct) == expected
    assert oracle_risk_coverage(correct)[2] == expected


def test_oracle_is_never_worse_than_a_scorer():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        correct = torch.rand(50, generator=generator) < 0.7
        scores = torch.rand(50, generator=generator).round(decimals=1)  # many ties
        coverage, risk = risk_coverage(scores, correct)
        oracle_cov, oracle_risk, oracle_aurc = oracle_risk_coverage(correct)
        assert oracle_aurc <= aurc(scores, correct) + 1e-9
        at = (coverage * 50).round().long() - 1
        assert (oracle_risk[at] <= risk + 1e-9).all()


def test_thresholds_reach_target_coverage_on_validation():
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    correct = torch.ones(1000, dtype=torch.bool)
    for target in (0.8, 0.85, 0.9, 0.95, 1.0):
        t = threshold_for_coverage(scores, target)
        assert selective_at_threshold(scores, correct, t)["coverage"] == pytest.approx(target)
    tied = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.1])
    assert (
        selective_at_threshold(tied, torch.ones(5, dtype=torch.bool), threshold_for_coverage(tied, 0.4))[
            "coverage"
        ]
        == 0.8
    )


def test_scorers():
    initial = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    tuned = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]))
    s = classification_scorers(initial, tuned, torch.tensor([1.0, 1.0, 0.5]))
    agree_scores, agree_pred = s["agreement rule (ERM + MaskTune)"]
    assert agree_pred.tolist() == [0, 0] and agree_scores[0] > agree_scores[1]  # agreement ranks first
    paper_scores, paper_pred = s["paper score (ERM x MaskTune)"]
    product = torch.tensor([0.42, 0.06, 0.01]).softmax(0)
    assert paper_scores[0].item() == pytest.approx(product.max().item()) and paper_pred[0] == 0


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_std([0.7]) == (0.7, 0.0)


def test_attribute_metrics_by_hand():

    labels = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]])
    predicted = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 1], [1, 0]])
    m = attribute_metrics(predicted, labels, ["A", "B"])
    # A: tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3, accuracy 3/5; B: tp 2, fp 1, fn 0
    assert m["per_attribute"]["A"] == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3}
    )
    assert m["per_attribute"]["B"] == pytest.approx(
        {"accuracy": 0.8, "precision": 2 / 3, "recall": 1.0, "f1": 0.8}
    )
    assert m["mean_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    spurious = torch.tensor([1, 1, 0, 0, 0])
    g = attribute_group_accuracy(predicted, labels, spurious, ["A", "B"], "Male")["A"]
    # groups of A: (1,1): rows 0,1 -> 1/2; (0,0): rows 2,3 -> 1/2; (1,0): row 4 -> 1
    assert g["per_group"] == {"A=0,Male=0": 0.5, "A=1,Male=0": 1.0, "A=1,Male=1": 0.5}
    assert g["worst_group_accuracy"] == 0.5


def test_multilabel_agreement_rule_by_hand():
    """Three images, two attributes. Image 0: the models agree on both, the tuned one is sure and right;
    image 1: they agree, but one decision is unsure (0.6 < 0.7); image 2: they disagree on attribute B."""
    p_initial = torch.tensor([[0.9, 0.1], [0.8, 0.3], [0.9, 0.2]])
    p_tuned = torch.tensor([[0.95, 0.05], [0.6, 0.1], [0.9, 0.8]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    rule = multilabel_agreement_rule(p_initial, p_tuned, labels, 0.7, ["A", "B"])
    image, decision = rule["image_rule"], rule["attribute_rule"]
    assert image["coverage"] == pytest.approx(1 / 3) and image["exact_match_on_accepted"] == 1.0
    assert image["agreement_rate"] == pytest.approx(2 / 3)
    # accepted: (0, A), (0, B), (1, B), (2, A), all right; (1, A) is unsure, on (2, B) they disagree
    assert decision["coverage"] == pytest.approx(4 / 6) and decision["accuracy_on_accepted"] == 1.0
    assert decision["per_attribute"]["A"]["coverage"] == pytest.approx(2 / 3)
