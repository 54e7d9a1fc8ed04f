"""Every VGG script end to end on tiny synthetic data, as a user runs them."""
import csv
import json
import os

import pytest
import torch

from checkpoint import load_checkpoint, load_weights
from conftest import run_script
from models import VGGWithAttention

FAST = ["--num_epochs=2", "--batch_size=32", "--eval_batch_size=128", "--val_size=60", "--learning_rate=0.02"]


@pytest.fixture(scope="module", params=["cifar", "folder"])
def vgg_run(request, tmp_path_factory, cifar_dir, folder_dir):
    """One vgg.py run per data format: CIFAR pickles with xgradcam, ImageFolder with attention masks."""
    data_dir, masking = (cifar_dir, "xgradcam") if request.param == "cifar" else (folder_dir, "attention")
    work = tmp_path_factory.mktemp(request.param)
    ckpt, out = str(work / "ckpt"), str(work / "out")
    result = run_script("vgg.py", f"--data_dir={data_dir}", f"--checkpoint_dir={ckpt}", f"--out_dir={out}",
                        f"--masking={masking}", *FAST)
    return {"ckpt": ckpt, "out": out, "stdout": result.stdout, "data": request.param, "masking": masking}


def test_vgg_writes_reloadable_checkpoints_and_figures(vgg_run):
    for name in ("initial", "finetuned", "nomask", "randommask"):
        state = load_checkpoint(os.path.join(vgg_run["ckpt"], f"vgg_{name}.pt"), "VGGWithAttention")
        load_weights(VGGWithAttention(state["num_classes"]), state)
        assert state["config"]["masking"] == vgg_run["masking"] and state["optimizer"] is not None
        assert 0 <= state["metrics"]["test_accuracy"] <= 1
    for figure in ("masks.png", "training_curves.png"):
        assert os.path.getsize(os.path.join(vgg_run["out"], figure)) > 1000
    summary = json.load(open(os.path.join(vgg_run["out"], "summary.json")))
    assert 0 < summary["masked_fraction"] < 1
    assert "pixels masked on average" in vgg_run["stdout"]


def test_controls_differ_from_masktune_only_in_the_masks(vgg_run):
    names = ("finetuned", "nomask", "randommask")
    states = {n: load_checkpoint(os.path.join(vgg_run["ckpt"], f"vgg_{n}.pt")) for n in ("initial", *names)}
    erm = load_weights(VGGWithAttention(states["initial"]["num_classes"]), states["initial"])
    from engine import weights_sha1
    for n in names:  # same starting weights, same batches in the same order, one more epoch
        assert states[n]["metrics"]["start_weights_sha1"] == weights_sha1(erm)
        assert states[n]["metrics"]["batch_order_sha1"] == states["finetuned"]["metrics"]["batch_order_sha1"]
        assert states[n]["epoch"] == states["initial"]["epoch"] + 1
    assert states["nomask"]["metrics"]["masked_fraction"] == 0.0
    assert states["randommask"]["metrics"]["masked_fraction"] == states["finetuned"]["metrics"]["masked_fraction"] > 0
    assert not torch.equal(states["finetuned"]["model"]["fc3.weight"], states["nomask"]["model"]["fc3.weight"])


def test_evaluate_vgg(vgg_run):
    out = os.path.join(vgg_run["out"], "eval")
    result = run_script("evaluate_vgg.py", f"--checkpoint_dir={vgg_run['ckpt']}", f"--out_dir={out}")
    assert "total (masked)" in result.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert set(metrics["models"]) == {"ERM", "MaskTune", "no-mask control", "random-mask control"}
    for m in metrics["models"].values():
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["masked_test_accuracy"] <= 1
    rows = list(csv.DictReader(open(os.path.join(out, "predictions.csv"))))
    assert len(rows) == (100 if vgg_run["data"] == "cifar" else 36)
    for column in ("index", "path", "label", "prediction_initial", "confidence_initial", "prediction_finetuned",
                   "confidence_finetuned"):
        assert column in rows[0]
    assert all(0 < float(r["confidence_finetuned"]) <= 1 for r in rows)
    assert (rows[0]["path"] != "") == (vgg_run["data"] == "folder")
    # the stored accuracy agrees with the per-image predictions
    acc = sum(r["prediction_finetuned"] == r["label"] for r in rows) / len(rows)
    assert acc == pytest.approx(metrics["models"]["MaskTune"]["test_accuracy"])
    assert os.path.getsize(os.path.join(out, "per_class_accuracy.png")) > 1000


def test_selective_classification_vgg(vgg_run):
    out = os.path.join(vgg_run["out"], "selective")
    difficult = [] if vgg_run["data"] == "folder" else ["bird", "cat", "deer", "dog"]
    run_script("selective_classification_vgg.py", f"--checkpoint_dir={vgg_run['ckpt']}", f"--out_dir={out}",
               f"--difficult_classes={json.dumps(difficult)}")
    result = json.load(open(os.path.join(out, "selective.json")))
    rule = result["report_rule"]["MaskTune"]
    assert rule["coverage"] + rule["rejection_rate"] == pytest.approx(1)
    assert rule["coverage"] <= rule["agreement_rate"]
    scorers = {row["scorer"]: row for row in result["scorers"]}
    oracle = scorers.pop("oracle (MaskTune predictions)")
    assert oracle["aurc"] <= scorers["SR MaskTune"]["aurc"] + 1e-9
    assert all(row["coverage@1"] == 1.0 for row in scorers.values())
    assert os.path.getsize(os.path.join(out, "risk_coverage.png")) > 1000


@pytest.mark.parametrize("args, message", [
    (["--batch_sise=4"], "unknown hyperparameter 'batch_sise'"),
    (["--batch_size=0"], "batch sizes must be positive"),
    (["--masking=gradcam"], "unknown masking strategy 'gradcam'"),
    (["--learning_rate=abc"], "--learning_rate expects a float"),
    (["--device=cuda:7"], "device 'cuda:7'"),
])
def test_bad_input_is_one_clear_line(args, message, tmp_path):
    result = run_script("vgg.py", f"--checkpoint_dir={tmp_path}", *args, check=False)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_evaluate_refuses_a_missing_run(tmp_path):
    result = run_script("evaluate_vgg.py", f"--checkpoint_dir={tmp_path}", check=False)
    assert result.returncode == 1 and "run the training script first" in result.stderr
