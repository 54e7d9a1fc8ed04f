"""The fast tier runs every script once with --dry_run=True on tiny synthetic data in the real formats: a
typo or a broken import in any script fails here in seconds, not in a slow end-to-end test."""

import json
import os

import pytest
import torch

from conftest import run_here, write_image_folder
from masktune.checkpoint import load_checkpoint
from masktune.console import UserError

SMALL = ["--dry_run=True", "--batch_size=64", "--eval_batch_size=256"]


def test_the_vgg_scripts_and_the_results_table(tmp_path, cifar_dir):
    args = [
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        *SMALL,
    ]
    run_here("vgg.py", *args, "--shortcut=square", "--mask_rounds=2", "--controls=False")
    assert os.path.getsize(tmp_path / "ckpt" / "vgg_round1.pt") > 0  # the fine-tune between mask rounds
    run_here("evaluate_vgg.py", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out")
    run_here(
        "selective_classification_vgg.py", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out"
    )
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["finetune_epochs_run"] == 1 and summary["machine"]
    peaks = summary["peak_memory_gb"]  # the host's peak so far never falls from one stage to the next
    assert list(peaks) == ["data", "ERM", "masking", "fine-tunes"]
    assert 0 < peaks["data"]["host_gb"] <= peaks["fine-tunes"]["host_gb"] < 64
    for name in ("metrics.json", "selective.json", "why.png", "risk_coverage.png"):
        assert os.path.getsize(tmp_path / "out" / name) > 0, name
    table = run_here("collect_results.py", f"{tmp_path}/out", "--targets")
    method = "integrated, decisive, completed first, shared 0.5, consensus 0.3, 2 rounds, shuffle_union"
    assert "| ERM |" in table and f"| MaskTune, {method} |" in table
    assert f"| MaskTune, round 1 ({method}) |" in table  # mask_rounds=1's
    assert "worst group - ERM's >= 30" in table and "AURC x 100" in table
    headline = run_here("collect_results.py", f"{tmp_path}/out", "--headline")
    assert "| no-mask control | MaskTune, defaults |" in headline and ": worst group |" in headline


def test_the_resnet_scripts(tmp_path):
    data = write_image_folder(str(tmp_path / "data"), per_class=5, per_class_test=2)
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        "--image_size=32",
        "--pretrained=False",
        "--dry_run=True",
        "--batch_size=12",
        "--masking=xgradcam",
        "--controls=False",
    ]
    run_here("resnet50.py", *args)
    run_here(
        "selective_classification_resnet.py", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out"
    )
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert set(metrics["models"]) == {"ERM", "MaskTune"}
    assert list(metrics["peak_memory_gb"]) == ["data", "ERM", "masking", "fine-tunes", "evaluation"]


def test_bench():
    out = run_here("bench.py", "--dry_run=True", "--device=cpu", "--reference=False", "--resnet=False")
    for stage in (
        "(a) VGG ERM training",
        "(b) VGG masking, gradient, decisive extent",
        "(c) VGG fine-tuning",
    ):
        assert stage in out


@pytest.mark.slow
def test_bench_with_resnet50_and_the_references():
    out = run_here("bench.py", "--dry_run=True", "--device=cpu")
    for stage in ("(a) ResNet50 training", "(b) ResNet50 masking", "pytorch-grad-cam", "DataLoader+PIL"):
        assert stage in out


@pytest.mark.slow
def test_resume_keeps_a_finished_mask_round(tmp_path, cifar_dir):
    """Stopped after the round's fine-tune: --resume=True keeps it and computes the same masks again."""
    args = [
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        *SMALL,
    ]
    args += ["--shortcut=square", "--mask_rounds=2", "--controls=False"]
    run_here("vgg.py", *args)
    masks_sha1 = json.load(open(tmp_path / "out" / "summary.json"))["masks_sha1"]
    os.remove(tmp_path / "ckpt" / "vgg_finetuned.pt")
    log = run_here("vgg.py", *args, "--resume=True")
    assert "fine-tune round1: done before, kept" in log
    assert json.load(open(tmp_path / "out" / "summary.json"))["masks_sha1"] == masks_sha1


def test_no_class_with_enough_masked_images_means_the_no_mask_fine_tune(tmp_path, cifar_dir):
    """With ``mask_class_share`` above every class's share of masked images the masks are dropped: MaskTune's
    fine-tune is the no-mask control's, weight for weight, and the controls are copied, not trained again."""
    args = [f"--data_dir={cifar_dir}", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out"]
    out = run_here("vgg.py", *args, *SMALL, "--mask_class_share=0.99", "--masking=gradient")
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert max(summary["class_mask_rates"]) < 0.99 and summary["masked_fraction"] == 0
    assert "under mask_class_share=0.99: no masks" in out
    assert "fine-tune nomask epoch" not in out and "fine-tune randommask epoch" not in out
    assert "fine-tune randommask: the same training as fine-tune finetuned" in out
    tuned, plain = (load_checkpoint(tmp_path / "ckpt" / f"vgg_{n}.pt") for n in ("finetuned", "randommask"))
    assert all(torch.equal(tuned["model"][k], plain["model"][k]) for k in tuned["model"])
    assert (
        plain["stage"] == "fine-tune randommask"
        and plain["metrics"]["history"] == tuned["metrics"]["history"]
    )
    run_here("evaluate_vgg.py", *args)  # the copies load as the controls' checkpoints


@pytest.mark.slow
def test_the_class_consensus_only_adds_to_the_masks(tmp_path, cifar_dir):
    """From the same ERM model, ``mask_consensus`` (on by default) keeps every pixel of the decisive masks
    and may add to them; the run records the share it used. The class shares the run reports, which
    ``mask_class_share`` judges, are those of the images' own masks, before the consensus."""
    args = [
        f"--data_dir={cifar_dir}",
        *SMALL,
        "--masking=gradient",
        "--mask_class_share=0",
        "--controls=False",
    ]
    run_here(
        "vgg.py", *args, "--mask_consensus=0", f"--checkpoint_dir={tmp_path}/a", f"--out_dir={tmp_path}/a"
    )
    erm = [f"--erm_dir={tmp_path}/a", f"--checkpoint_dir={tmp_path}/b", f"--out_dir={tmp_path}/b"]
    run_here("vgg.py", *args, *erm)
    alone, joined = (json.load(open(tmp_path / r / "summary.json")) for r in ("a", "b"))
    assert joined["config"]["mask_consensus"] == 0.3
    assert joined["masked_fraction"] >= alone["masked_fraction"]
    assert joined["class_mask_rates"] == alone["class_mask_rates"]


@pytest.mark.slow
def test_planted_masks_hide_the_whole_marker_and_need_one(tmp_path, cifar_dir):
    """``masking=planted`` masks the planted marker's own pixels (an upper bound for any saliency map)."""
    args = [f"--data_dir={cifar_dir}", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out"]
    out = run_here("vgg.py", *args, *SMALL, "--masking=planted", "--shortcut=frame", "--controls=False")
    assert "masks hide 100.0% of the planted marker on average" in out
    assert "the planted marker is on 100.0-100.0% of a class" in out
    run_here("evaluate_vgg.py", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out")
    table = run_here("collect_results.py", f"{tmp_path}/out")
    assert "| MaskTune, the planted marker as the mask, shuffle_union |" in table
    with pytest.raises(UserError, match="masking='planted' needs a planted shortcut"):
        run_here("vgg.py", *args, *SMALL, "--masking=planted")
