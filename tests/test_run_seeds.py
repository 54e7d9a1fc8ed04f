import json
import os

import pytest

from conftest import run_here


def test_mean_and_std_over_seeds_from_fixed_numbers(tmp_path):
    """Seeds whose results exist are read, not rerun; the summary is the mean and sample std."""
    numbers = {0: (0.80, 0.70, 0.30), 1: (0.82, 0.74, 0.50), 2: (0.84, 0.72, 0.40)}
    for seed, (clean, masked, worst) in numbers.items():
        os.makedirs(tmp_path / f"seed{seed}")
        json.dump(
            {
                "models": {
                    "ERM": {
                        "test_accuracy": clean,
                        "masked_test_accuracy": masked,
                        "worst_group_accuracy": worst,
                        "groups": {"per_group": {}},
                    }
                }
            },
            open(tmp_path / f"seed{seed}" / "metrics.json", "w"),
        )
        json.dump(
            {
                "report_rule": {"MaskTune": {"accuracy_on_accepted": 0.9, "coverage": clean}},
                "scorers": [{"scorer": "SR ERM", "aurc": 0.1 * seed}],
            },
            open(tmp_path / f"seed{seed}" / "selective.json", "w"),
        )
    recipe = tmp_path / "recipe.py"
    recipe.write_text("num_epochs = 2\n")
    run_here(
        "run_seeds.py",
        str(recipe),
        f"--out_dir={tmp_path}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        "--dry_run=True",
    )
    saved = json.load(open(tmp_path / "seeds.json"))
    assert saved["experiment"] == [str(recipe), "--dry_run=True"]  # what each script would have been given
    summary = saved["summary"]
    assert summary["ERM | test accuracy"]["mean"] == pytest.approx(0.82)
    assert summary["ERM | test accuracy"]["std"] == pytest.approx(0.02)
    assert summary["ERM | masked test accuracy"]["std"] == pytest.approx(0.02)
    assert summary["ERM | worst group accuracy"]["mean"] == pytest.approx(0.4)
    assert summary["ERM | worst group accuracy"]["std"] == pytest.approx(0.1)
    assert summary["SR ERM | AURC"]["mean"] == pytest.approx(0.1)
    assert "| ERM | test accuracy | 82.00 +/- 2.00 |" in open(tmp_path / "seeds.md").read()
    assert not os.path.exists(tmp_path / "ckpt")  # nothing was retrained
