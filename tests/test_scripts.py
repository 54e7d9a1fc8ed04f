"""Every VGG script end to end on tiny synthetic data, as a user runs them."""

import csv
import json
import os

import pytest
import torch

from conftest import run_here, run_script, write_image_folder
from masktune.checkpoint import load_checkpoint, load_weights
from masktune.console import UserError
from masktune.engine import weights_sha1
from models import VGGWithAttention

pytestmark = pytest.mark.slow
FAST = [
    "--num_epochs=2",
    "--batch_size=32",
    "--eval_batch_size=128",
    "--val_fraction=0.2",
    "--finetune_epochs=1",
    "--finetune_min_steps=0",
]


@pytest.fixture(scope="module", params=["cifar", "folder"])
def vgg_run(request, tmp_path_factory, cifar_dir, folder_dir):
    """One vgg.py run per data format: CIFAR pickles with xgradcam masks, an image folder with attention
    masks of the fixed extent (the decisive one may find nothing decisive in a tiny model: no masks)."""
    data_dir, masking = (cifar_dir, "xgradcam") if request.param == "cifar" else (folder_dir, "attention")
    work = tmp_path_factory.mktemp(request.param)
    args = [
        f"--data_dir={data_dir}",
        f"--checkpoint_dir={work}/ckpt",
        f"--out_dir={work}/out",
        f"--masking={masking}",
        "--mask_extent=fixed",
        *FAST,
    ]
    return {
        "args": args,
        "ckpt": f"{work}/ckpt",
        "out": f"{work}/out",
        "stdout": run_here("vgg.py", *args),
        "data": request.param,
        "masking": masking,
    }


def test_vgg_writes_reloadable_checkpoints_and_figures(vgg_run):
    for name in ("initial", "last", "finetuned", "nomask", "randommask"):
        state = load_checkpoint(os.path.join(vgg_run["ckpt"], f"vgg_{name}.pt"), "VGGWithAttention")
        load_weights(VGGWithAttention(state["num_classes"]), state)
        assert state["config"]["masking"] == vgg_run["masking"] and state["optimizer"] is not None
        assert 0 <= state["metrics"]["test_accuracy"] <= 1
    for figure in ("why.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(vgg_run["out"], figure)) > 1000
    summary = json.load(open(os.path.join(vgg_run["out"], "summary.json")))
    assert 0 < summary["masked_fraction"] < 1
    assert "pixels masked on average" in vgg_run["stdout"]


def test_controls_differ_from_masktune_only_in_the_masks(vgg_run):
    names = ("finetuned", "nomask", "randommask")
    states = {n: load_checkpoint(os.path.join(vgg_run["ckpt"], f"vgg_{n}.pt")) for n in ("initial", *names)}
    start = load_checkpoint(os.path.join(vgg_run["ckpt"], "vgg_last.pt"))  # finetune_from = "last"
    erm = load_weights(VGGWithAttention(start["num_classes"]), start)
    for n in names:  # same starting weights, same batches in the same order, one epoch
        assert states[n]["metrics"]["start_weights_sha1"] == weights_sha1(erm)
        assert states[n]["metrics"]["batch_order_sha1"] == states["finetuned"]["metrics"]["batch_order_sha1"]
        assert states[n]["epoch"] == 1
    assert states["nomask"]["metrics"]["masked_fraction"] == 0.0
    assert (
        states["randommask"]["metrics"]["masked_fraction"]
        == states["finetuned"]["metrics"]["masked_fraction"]
        > 0
    )
    assert not torch.equal(
        states["finetuned"]["model"]["fc3.weight"], states["nomask"]["model"]["fc3.weight"]
    )


def test_evaluate_vgg_with_the_runs_own_flags(vgg_run):
    out = run_here("evaluate_vgg.py", *vgg_run["args"])  # one command line serves every script
    assert "masked total" in out
    metrics = json.load(open(os.path.join(vgg_run["out"], "metrics.json")))
    assert set(metrics["models"]) == {"ERM", "MaskTune", "no-mask control", "random-mask control"}
    for m in metrics["models"].values():
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["masked_test_accuracy"] <= 1
    rows = list(csv.DictReader(open(os.path.join(vgg_run["out"], "predictions.csv"))))
    assert len(rows) == (100 if vgg_run["data"] == "cifar" else 36)
    assert all(0 < float(r["confidence_finetuned"]) <= 1 for r in rows)
    assert (rows[0]["path"] != "") == (vgg_run["data"] == "folder")
    # the stored accuracy agrees with the per-image predictions
    acc = sum(r["prediction_finetuned"] == r["label"] for r in rows) / len(rows)
    assert acc == pytest.approx(metrics["models"]["MaskTune"]["test_accuracy"])
    assert os.path.getsize(os.path.join(vgg_run["out"], "per_class_accuracy.png")) > 1000


def test_an_evaluation_flag_that_differs_from_the_run_is_refused(vgg_run):
    with pytest.raises(UserError, match=r"num_epochs=3 differs from the run in .* \(num_epochs=2\)"):
        run_here("evaluate_vgg.py", *vgg_run["args"], "--num_epochs=3")
    with pytest.raises(UserError, match="unknown hyperparameter 'num_epoch'"):
        run_here("selective_classification_vgg.py", *vgg_run["args"], "--num_epoch=2")


def test_selective_classification_vgg_with_the_default_classes_on_any_data(vgg_run):
    out = run_here("selective_classification_vgg.py", *vgg_run["args"])
    if vgg_run["data"] == "folder":  # cat, dog, frog: only cat and dog of the report's classes are here
        assert "weight 0.7 for cat, dog" in out
    else:
        assert "weight 0.7 for bird, cat, deer, dog" in out
    result = json.load(open(os.path.join(vgg_run["out"], "selective.json")))
    rule = result["report_rule"]["MaskTune"]
    assert rule["coverage"] + rule["rejection_rate"] == pytest.approx(1)
    assert rule["coverage"] <= rule["agreement_rate"]
    scorers = {row["scorer"]: row for row in result["scorers"]}
    oracle = scorers.pop("oracle (MaskTune predictions)")
    assert oracle["aurc"] <= scorers["SR MaskTune"]["aurc"] + 1e-9
    assert all(row["coverage@1"] == 1.0 for row in scorers.values())
    assert os.path.getsize(os.path.join(vgg_run["out"], "risk_coverage.png")) > 1000


def test_selective_classification_without_any_of_the_difficult_classes(tmp_path):
    data = write_image_folder(
        str(tmp_path / "data"), classes=("apple", "pear"), per_class=20, per_class_test=6
    )
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        *FAST,
        "--num_epochs=1",
        "--controls=False",
    ]
    run_here("vgg.py", *args)
    out = run_here("selective_classification_vgg.py", *args)
    assert "none of ['bird', 'cat', 'deer', 'dog'] is a class of this data: the rule runs unweighted" in out


def test_reusing_an_erm_run_and_refusing_one_on_other_data(vgg_run, tmp_path):
    args = [a for a in vgg_run["args"] if not a.startswith(("--checkpoint_dir", "--out_dir"))]
    out = run_here(
        "vgg.py",
        *args,
        f"--erm_dir={vgg_run['ckpt']}",
        f"--checkpoint_dir={tmp_path}",
        f"--out_dir={tmp_path}/out",
        "--controls=False",
        "--finetune_from=last",
    )
    assert "ERM: reusing" in out and "ERM epoch" not in out
    last = load_checkpoint(os.path.join(vgg_run["ckpt"], "vgg_last.pt"))
    tuned = load_checkpoint(str(tmp_path / "vgg_finetuned.pt"))
    erm = load_weights(VGGWithAttention(last["num_classes"]), last)
    assert tuned["metrics"]["start_weights_sha1"] == weights_sha1(erm)  # started from the last ERM epoch
    with pytest.raises(UserError, match="holds an ERM trained on other data: shortcut=''"):
        run_here(
            "vgg.py",
            *args,
            f"--erm_dir={vgg_run['ckpt']}",
            f"--checkpoint_dir={tmp_path}/b",
            f"--out_dir={tmp_path}/b",
            "--shortcut=square",
        )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("initial", "last"):
        state = torch.load(os.path.join(vgg_run["ckpt"], f"vgg_{name}.pt"), weights_only=True)
        torch.save({**state, "epoch": 1}, unfinished / f"vgg_{name}.pt")  # as if killed after epoch 1
    with pytest.raises(UserError, match="holds an unfinished ERM \\(epoch 1 of 2\\)"):
        run_here(
            "vgg.py",
            *args,
            f"--erm_dir={unfinished}",
            f"--checkpoint_dir={tmp_path}/c",
            f"--out_dir={tmp_path}/c",
        )


def test_a_mistyped_flag_is_one_clear_line(tmp_path):
    """As a user sees it, in a new process (test_config.py and the bad-input matrix check the messages)."""
    result = run_script("vgg.py", f"--checkpoint_dir={tmp_path}", "--batch_sise=4", check=False)
    assert result.returncode == 1
    assert "unknown hyperparameter 'batch_sise'" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_evaluate_refuses_a_missing_run(tmp_path):
    with pytest.raises(UserError, match="run the training script first"):
        run_here("evaluate_vgg.py", f"--checkpoint_dir={tmp_path}", f"--out_dir={tmp_path}")
