import json
import os

import pytest

from conftest import run_here
from masktune import sweeps
from masktune.console import UserError


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


@pytest.mark.slow
def test_a_seed_run_by_submitits_local_executor_is_collected(tmp_path, cifar_dir):
    """The submitit launcher runs each seed's scripts in a job of its own (the mean over several seeds is
    checked above, from fixed numbers)."""
    pytest.importorskip("submitit")
    run_here(
        "run_seeds.py",
        f"--data_dir={cifar_dir}",
        f"--out_dir={tmp_path}/out",
        f"--checkpoint_dir={tmp_path}/ckpt",
        "--seeds=[1]",
        "--launcher=submitit_local",
        "--selective=False",
        "--dry_run=True",
        "--controls=False",
        "--batch_size=64",
    )
    saved = json.load(open(tmp_path / "out" / "seeds.json"))
    assert list(saved["per_seed"]) == ["1"]
    summary = json.load(open(tmp_path / "out" / "seed1" / "summary.json"))  # in its own folders, its own seed
    assert summary["config"]["seed"] == 1 and summary["config"]["checkpoint_dir"].endswith("seed1")
    assert "evaluate_vgg.py" in open(tmp_path / "out" / "seed1" / "run.log").read()  # and logged there
    assert 0 <= saved["summary"]["MaskTune | test accuracy"]["mean"] <= 1


@pytest.mark.slow
def test_a_failed_seed_is_one_line_naming_its_log(tmp_path):
    os.makedirs(tmp_path / "empty" / "train")  # an image folder without images: vgg.py stops at once
    with pytest.raises(UserError, match=r"failed: seed 0 \(exit 1, see .*seed0/run.log\)"):
        run_here(
            "run_seeds.py",
            f"--data_dir={tmp_path}/empty",
            f"--out_dir={tmp_path}/out",
            "--seeds=[0]",
            "--launcher=parallel",
            "--workers=1",
        )
    assert "error: " in open(tmp_path / "out" / "seed0" / "run.log").read()


def test_more_parallel_workers_than_gpus_share_the_visible_gpus(monkeypatch):
    """Worker slots map onto the GPUs this process sees, round robin; none on a machine without a GPU."""
    monkeypatch.setattr(sweeps.torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [sweeps.gpu_of_slot(s) for s in range(3)] == [{"CUDA_VISIBLE_DEVICES": "0"}] * 3
    monkeypatch.setattr(sweeps.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert [sweeps.gpu_of_slot(s)["CUDA_VISIBLE_DEVICES"] for s in range(4)] == ["2", "5", "2", "5"]
    monkeypatch.setattr(sweeps.torch.cuda, "device_count", lambda: 0)
    assert sweeps.gpu_of_slot(1) == {}
