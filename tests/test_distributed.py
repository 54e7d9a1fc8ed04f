"""vgg.py under torchrun: 2 CPU processes (Gloo) train with DDP, mask a share each, write one set of files."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env
from masktune.checkpoint import load_checkpoint, load_weights
from masktune.datasets import experiment_data
from masktune.device import prepare_model
from masktune.masking import add_consensus, compute_masks, mask_settings, other_class_partners
from masktune.pipeline import masks_sha1
from masktune.seeds import stream
from models import VGGWithAttention

pytestmark = pytest.mark.slow


def test_two_process_gloo_run_matches_single_process_masking(cifar_dir, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "vgg.py"),
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        "--num_epochs=2",
        "--batch_size=16",
        "--eval_batch_size=64",
        "--val_fraction=0.2",
        "--device=cpu",
        "--finetune_epochs=1",
        "--finetune_min_steps=0",
    ]
    env = child_env(OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("data: ") == 1 and result.stdout.count("config: ") == 1  # rank 0 prints
    assert sorted(os.listdir(tmp_path / "ckpt")) == [
        f"vgg_{n}.pt" for n in ("finetuned", "initial", "last", "nomask", "randommask")
    ]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["processes"] == 2
    # the masks the two processes computed (each half of the set, gathered) equal a single-process masking
    state = load_checkpoint(str(tmp_path / "ckpt" / "vgg_initial.pt"))
    train, _, _ = experiment_data(state["config"])
    cpu = torch.device("cpu")  # the same model format and precision as the run
    model = prepare_model(
        load_weights(VGGWithAttention(len(train.classes)), state),
        cpu,
        channels_last=state["config"]["channels_last"],
    )
    config = state["config"]
    partners = other_class_partners(train.labels, stream(config["seed"], "mask_partners"))
    masks = compute_masks(
        model,
        train.images,
        config["masking"],
        batch_size=64,
        partners=partners,
        **mask_settings(config),
        amp=config["amp"],
        packed=True,
    )
    assert config["mask_consensus"] > 0  # the default: each class's consensus is added, as Run.masks_of does
    masks = add_consensus(
        model,
        train.images,
        masks,
        train.labels,
        partners,
        config["mask_consensus"],
        batch_size=64,
        amp=config["amp"],
    )
    assert masks_sha1(masks) == summary["masks_sha1"]
    finetuned = load_checkpoint(str(tmp_path / "ckpt" / "vgg_finetuned.pt"))
    assert finetuned["metrics"]["masks_sha1"] == summary["masks_sha1"]


FEWER_IMAGES_THAN_PROCESSES = """
import sys
import torch
from masktune.distributed import init_distributed, rank
from masktune.engine import predict
from masktune.masking import compute_masks
from models import VGGWithAttention
device = init_distributed(torch.device("cpu"))
torch.manual_seed(0)  # the same model in every process
model, images = VGGWithAttention(10), torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
logits = predict(model, images, batch_size=4)
masks = compute_masks(model, images, "xgradcam", batch_size=4)
torch.save({"logits": logits, "masks": masks}, f"{sys.argv[1]}/rank{rank()}.pt")
"""


def two_processes(tmp_path, source: str, *args: str) -> list[dict]:
    """Run the script ``source`` under torchrun in 2 CPU processes (Gloo) with ``tmp_path`` and ``args`` as
    its arguments; each process saves what it found to ``tmp_path/rank<N>.pt``: both, loaded."""
    script = tmp_path / "two_processes.py"
    script.write_text(source)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = child_env(OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*command, str(script), str(tmp_path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_prediction_and_masking_with_fewer_images_than_processes(tmp_path):
    """Process 1 has no image of its own: it must still take part in the gather (not hang) and get it all."""
    first, second = two_processes(tmp_path, FEWER_IMAGES_THAN_PROCESSES)
    assert first["logits"].shape == (1, 10) and first["masks"].shape == (1, 32, 32)
    assert torch.equal(first["logits"], second["logits"]) and torch.equal(first["masks"], second["masks"])


SHARDED_CACHE = """
import sys
import masktune.images as images_module
from masktune.distributed import init_distributed, rank
import torch
init_distributed(torch.device("cpu"))
decoded = []
read = images_module._read_image
images_module._read_image = lambda path, size: decoded.append(path) or read(path, size)
images = images_module.read_images(sys.argv[3:], 8, cache_dir=sys.argv[2])
torch.save({"images": images.clone(), "decoded": decoded}, f"{sys.argv[1]}/rank{rank()}.pt")
"""


def test_two_processes_decode_a_share_each_into_one_cache_file(tmp_path):
    """Under torchrun each process decodes its half of the files into the one cache file; both map all of
    it, equal to a single-process decoding."""
    from PIL import Image

    from masktune.images import read_images

    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (8, 8), (40 * i, 7, 200 - 30 * i)).save(paths[-1])
    cache_dir = tmp_path / "cache"
    first, second = two_processes(tmp_path, SHARDED_CACHE, str(cache_dir), *paths)
    assert first["decoded"] == paths[:3] and second["decoded"] == paths[3:]  # my_range's shares
    expected = read_images(paths, 8)
    assert torch.equal(first["images"], expected) and torch.equal(second["images"], expected)
    assert len(os.listdir(cache_dir)) == 1  # the cache, nothing partial left
