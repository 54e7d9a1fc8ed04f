import json
import os

import pytest

from conftest import run_script


def test_mean_and_std_over_seeds_from_fixed_numbers(tmp_path):
    """Seeds whose results exist are read, not rerun; the summary is the mean and sample std."""
    numbers = {0: (0.80, 0.70, 0.30), 1: (0.82, 0.74, 0.50), 2: (0.84, 0.72, 0.40)}
    for seed, (clean, masked, worst) in numbers.items():
        for folder in ("evaluate", "selective"):
            os.makedirs(tmp_path / f"seed{seed}" / folder)
        json.dump({"models": {"ERM": {"test_accuracy": clean, "masked_test_accuracy": masked,
                                      "spurious": {"worst_group_accuracy": worst}}}},
                  open(tmp_path / f"seed{seed}" / "evaluate" / "metrics.json", "w"))
        json.dump({"report_rule": {"MaskTune": {"accuracy_on_accepted": 0.9, "coverage": clean}},
                   "scorers": [{"scorer": "SR ERM", "aurc": 0.1 * seed}]},
                  open(tmp_path / f"seed{seed}" / "selective" / "selective.json", "w"))
    run_script("run_seeds.py", f"--out_dir={tmp_path}", f"--checkpoint_dir={tmp_path}/ckpt")
    summary = json.load(open(tmp_path / "seeds.json"))["summary"]
    assert summary["ERM | clean test accuracy"]["mean"] == pytest.approx(0.82)
    assert summary["ERM | clean test accuracy"]["std"] == pytest.approx(0.02)
    assert summary["ERM | masked test accuracy"]["std"] == pytest.approx(0.02)
    assert summary["ERM | worst group accuracy"]["mean"] == pytest.approx(0.4)
    assert summary["ERM | worst group accuracy"]["std"] == pytest.approx(0.1)
    assert summary["SR ERM | AURC"]["mean"] == pytest.approx(0.1)
    assert "| ERM | clean test accuracy | 82.00 +/- 2.00 |" in open(tmp_path / "seeds.md").read()
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was retrained
