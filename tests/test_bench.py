"""The fast data path yields exactly what the reference torchvision path yields (bench.py itself runs in
test_dry_runs.py; timings belong in the benchmark, not in a test)."""

import numpy as np
import pytest
import torch

from masktune.datasets import load_splits


@pytest.mark.slow
def test_fast_path_matches_torchvision_image_folder(folder_dir):
    from torchvision import datasets

    train, _, test = load_splits({"data_dir": folder_dir, "seed": 0})
    for ours, split in ((train, "train"), (test, "test")):
        reference = datasets.ImageFolder(f"{folder_dir}/{split}")
        assert ours.classes == reference.classes and len(ours) == len(reference)
        for i in range(0, len(reference), 7):
            image, label = reference[i]
            assert torch.equal(
                ours.images[i], torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
            )
            assert int(ours.labels[i]) == label
