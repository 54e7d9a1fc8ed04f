"""collect_results.py on hand-written runs: the tables' means and the targets against hand-computed values."""

import json
import os
import shutil

import pytest

from conftest import run_here
from masktune.console import UserError

CONFIG = {
    "data_dir": "/data/cifar10-jpg",
    "shortcut": "square",
    "shortcut_size": 4,
    "shortcut_classes": "all",
    "shortcut_ratio": 0.95,
    "masking": "gradient",
    "mask_extent": "decisive",
    "mask_fill": "shuffle_union",
    "finetune_min_steps": 500,
}


def write_run(
    folder: str,
    seed: int,
    masktune: dict,
    complete: bool,
    controls: bool,
    shortcut: str = "square",
    **settings,
) -> None:
    """metrics.json of one seed: ERM, MaskTune (and the no-mask control) with these test accuracies;
    ``settings``: the run's other settings that differ from ``CONFIG``."""
    os.makedirs(os.path.join(folder, f"seed{seed}"), exist_ok=True)
    erm = {"clean_accuracy": 0.6, "conflicting_accuracy": 0.3, "worst_group_accuracy": 0.0}
    models = {"ERM": erm, "MaskTune": masktune} | ({"no-mask control": erm} if controls else {})
    models = {m: v | {f"val_{k}": x for k, x in v.items()} for m, v in models.items()}
    config = CONFIG | {"seed": seed, "mask_complete": complete, "shortcut": shortcut, "controls": controls}
    config |= settings
    with open(os.path.join(folder, f"seed{seed}", "metrics.json"), "w") as f:
        json.dump({"models": models, "run_config": config, "machine": "a CPU"}, f)


def test_each_method_gets_its_own_mean_and_targets(tmp_path):
    completed, previous = str(tmp_path / "completed"), str(tmp_path / "previous")
    for seed, (clean, conflicting) in enumerate([(0.70, 0.69), (0.74, 0.71)]):
        masktune = {"clean_accuracy": clean, "conflicting_accuracy": conflicting, "worst_group_accuracy": 0.4}
        write_run(completed, seed, masktune, complete=True, controls=True)
    masktune = {"clean_accuracy": 0.6, "conflicting_accuracy": 0.5, "worst_group_accuracy": 0.1}
    write_run(previous, 0, masktune, complete=False, controls=False)
    printed = run_here("collect_results.py", completed, previous, "--targets")
    rows = {line.split(" | ")[0]: line for line in printed.splitlines() if line.startswith("| MaskTune")}
    completed_row = rows["| MaskTune, gradient, decisive, completed, shuffle_union"]
    assert "| 72.00 +/- 2.83 | 70.00 +/- 1.41 | 40.00 +/- 0.00 | – | 0, 1 |" in completed_row  # test columns
    assert "| 60.00 | 50.00 | 10.00 | – | 0 |" in rows["| MaskTune, gradient, decisive, shuffle_union"]
    name = "cifar10-jpg, square 4, ratio 0.95"
    targets = [line for line in printed.splitlines() if line.startswith(f"| {name} (")]
    completed_name, previous_name = (
        f"{name} (gradient, decisive, {m}shuffle_union)" for m in ("completed, ", "")
    )
    assert f"| {completed_name} | clean - conflicting <= 3 | +2.00 | met |" in targets
    assert f"| {previous_name} | worst group - ERM's >= 30 | +10.00 | **missed** |" in targets
    assert sum("no-mask control" in line for line in targets) == 1  # only the method that trained it


def test_the_no_mask_control_is_compared_on_the_seeds_that_trained_it(tmp_path):
    """Seed 0 trained the no-mask control and seed 1 did not: MaskTune's worst group is compared with the
    control's on seed 0 alone (40 - 0), not as the mean over both seeds (30), and the seed is named; the
    control's row in the table is over seed 0."""
    folder = str(tmp_path / "square")
    for seed, worst, controls in ((0, 0.4, True), (1, 0.2, False)):
        masktune = {"clean_accuracy": 0.7, "conflicting_accuracy": 0.7, "worst_group_accuracy": worst}
        write_run(folder, seed, masktune, complete=True, controls=controls)
    printed = run_here("collect_results.py", folder, "--targets")
    assert "| worst group - ERM's >= 30 | +30.00 | met |" in printed  # both seeds: (40 + 20) / 2 - 0
    assert "| worst group - no-mask control's >= 0 (seed 0) | +40.00 | met |" in printed
    control_row = next(line for line in printed.splitlines() if line.startswith("| no-mask control"))
    assert control_row.endswith("| 0.00 | – | 0 |")  # its own row, over the seed that trained it


def test_a_whole_image_shortcut_is_held_to_doing_no_harm(tmp_path):
    """No mask can remove a grain: its targets are the no-mask control's clean accuracy and worst group,
    not the markers' gap between clean and conflicting images."""
    folder = str(tmp_path / "grain")
    masktune = {"clean_accuracy": 0.55, "conflicting_accuracy": 0.3, "worst_group_accuracy": 0.0}
    write_run(folder, 0, masktune, complete=True, controls=True, shortcut="grain")
    printed = run_here("collect_results.py", folder, "--targets")
    targets = [line for line in printed.splitlines() if line.startswith("| cifar10-jpg, grain 4")]
    assert any(line.endswith("| clean - no-mask control's >= -1 | -5.00 | **missed** |") for line in targets)
    assert any(line.endswith("| worst group - no-mask control's >= 0 | +0.00 | met |") for line in targets)
    assert not any("conflicting" in line or "ERM's" in line for line in targets)


def test_the_erm_row_comes_from_the_method_with_the_most_seeds_and_data_can_be_renamed(tmp_path):
    """MaskTune as published reuses the defaults' ERM models; where fewer of its seeds finished, the ERM row
    still shows every seed. --data_name names a data folder."""
    defaults, published = str(tmp_path / "defaults"), str(tmp_path / "published")
    masktune = {"clean_accuracy": 0.7, "conflicting_accuracy": 0.6, "worst_group_accuracy": 0.4}
    for seed in (0, 1):
        write_run(defaults, seed, masktune, complete=True, controls=True)
    published_settings = {"masking": "xgradcam", "mask_fill": "black", "finetune_min_steps": 0}
    write_run(published, 0, masktune, complete=True, controls=False, **published_settings)
    printed = run_here("collect_results.py", published, defaults, "--data_name=cifar10-jpg:CIFAR-10 (JPEG)")
    assert "### CIFAR-10 (JPEG), square 4, ratio 0.95" in printed
    erm = next(line for line in printed.splitlines() if line.startswith("| ERM |"))
    assert erm.endswith("| 60.00 +/- 0.00 | 30.00 +/- 0.00 | 0.00 +/- 0.00 | – | 0, 1 |")


def test_the_headline_shows_each_benchmarks_target_metric_and_the_no_mask_control(tmp_path):
    """A marker's worst group; a grain's clean accuracy (no mask removes it: the masks must do no harm);
    MaskTune as published only where it ran."""
    square, grain = str(tmp_path / "square"), str(tmp_path / "grain")
    for seed, worst in enumerate([0.4, 0.5]):
        masktune = {"clean_accuracy": 0.7, "conflicting_accuracy": 0.6, "worst_group_accuracy": worst}
        write_run(square, seed, masktune, complete=True, controls=True)
    masktune = {"clean_accuracy": 0.55, "conflicting_accuracy": 0.3, "worst_group_accuracy": 0.0}
    write_run(grain, 0, masktune, complete=True, controls=True, shortcut="grain")
    rows = run_here("collect_results.py", square, grain, "--headline").splitlines()
    assert rows[0] == "| benchmark (test, %) | ERM | no-mask control | MaskTune, defaults | seeds |"
    assert "| cifar10-jpg, grain 4, ratio 0.95: clean | 60.00 | 60.00 | 55.00 | 1 |" in rows
    square_row = "| cifar10-jpg, square 4, ratio 0.95: worst group | 0.00 +/- 0.00 | 0.00 +/- 0.00 |"
    assert f"{square_row} 45.00 +/- 7.07 | 2 |" in rows


def test_runs_of_one_method_that_differ_in_another_setting_get_a_row_each(tmp_path):
    """Two fine-tune lengths from the same masks are two experiments, not two seeds of one: each gets its
    own row, named by the setting they differ in; runs that differ only in their controls are seeds of one."""
    runs = {"short": (0, 0.2, 500, False), "long": (0, 0.3, 1500, False), "rerun": (1, 0.4, 1500, True)}
    for name, (seed, worst, steps, controls) in runs.items():
        folder = str(tmp_path / name)
        masktune = {"clean_accuracy": 0.6, "conflicting_accuracy": 0.5, "worst_group_accuracy": worst}
        write_run(folder, seed, masktune, complete=True, controls=controls, finetune_min_steps=steps)
    printed = run_here("collect_results.py", *(str(tmp_path / name) for name in runs))
    rows = {line.split(" | ")[0]: line for line in printed.splitlines() if line.startswith("| MaskTune")}
    label = "| MaskTune, gradient, decisive, completed, shuffle_union, finetune_min_steps="
    assert set(rows) == {f"{label}500", f"{label}1500"}
    assert rows[f"{label}500"].endswith("| 60.00 | 50.00 | 20.00 | – | 0 |")
    assert rows[f"{label}1500"].endswith("| 50.00 +/- 0.00 | 35.00 +/- 7.07 | – | 0, 1 |")
    shutil.copytree(tmp_path / "long", tmp_path / "long_again")
    with pytest.raises(UserError, match="seed 0 of .* is there twice"):  # a rerun is not another seed
        run_here("collect_results.py", *(str(tmp_path / name) for name in runs), str(tmp_path / "long_again"))
