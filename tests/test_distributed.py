"""vgg.py under torchrun: 2 CPU processes (Gloo) train with DDP, mask a share each and write one set of files."""
import hashlib
import json
import os
import subprocess
import sys

import torch

from checkpoint import load_checkpoint, load_weights
from conftest import ROOT
from data import experiment_data
from engine import prepare_model
from masking import compute_masks
from models import VGG_MEAN, VGG_STD, VGGWithAttention


def test_two_process_gloo_run_matches_single_process_masking(cifar_dir, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "vgg.py"), f"--data_dir={cifar_dir}", f"--checkpoint_dir={tmp_path}/ckpt",
               f"--out_dir={tmp_path}/out", "--num_epochs=2", "--batch_size=16", "--eval_batch_size=64",
               "--val_size=50", "--device=cpu"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("data: ") == 1 and result.stdout.count("config: ") == 1  # rank 0 prints
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"vgg_{n}.pt" for n in
                                                     ("finetuned", "initial", "last", "nomask", "randommask")]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["processes"] == 2
    # the masks the two processes computed (each half of the set, gathered) equal a single-process masking
    state = load_checkpoint(str(tmp_path / "ckpt" / "vgg_initial.pt"))
    train, _, _ = experiment_data(state["config"])
    cpu = torch.device("cpu")  # the same model format and precision as the run
    model = prepare_model(load_weights(VGGWithAttention(len(train.classes)), state), cpu,
                          channels_last=state["config"]["channels_last"])
    masks = compute_masks(model, train.images, "xgradcam", batch_size=64, device=cpu, amp=state["config"]["amp"],
                          mean=VGG_MEAN, std=VGG_STD)
    assert hashlib.sha1(masks.numpy().tobytes()).hexdigest() == summary["masks_sha1"]
    finetuned = load_checkpoint(str(tmp_path / "ckpt" / "vgg_finetuned.pt"))
    assert finetuned["metrics"]["masks_sha1"] == summary["masks_sha1"]
