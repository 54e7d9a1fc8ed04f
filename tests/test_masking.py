import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import PATCH, patch_corner, planted_images
from device import prepare_model
from engine import accuracy, predict, train_epoch
from masking import (
    compute_masks,
    fill_masks,
    mean_std_threshold,
    quantile_threshold,
    random_masks_like,
    saliency_mask,
    xgradcam_saliency,
)
from models import VGGWithAttention


def test_mean_std_threshold_matches_hand_computation():
    cam = torch.tensor(
        [
            [[0.0, 1.0], [2.0, 3.0]],  # positives 1, 2, 3: mean 2, population std sqrt(2/3)
            [[0.0, 0.0], [0.0, 4.0]],  # one positive: std 0
            [[0.0, 0.0], [0.0, 0.0]],
        ]
    )  # none positive
    expected = torch.tensor([2 + 2 * (2 / 3) ** 0.5, 4.0, 0.0])
    assert torch.allclose(mean_std_threshold(cam, 2.0), expected)


def test_quantile_threshold_matches_hand_computation():
    cam = torch.arange(16, dtype=torch.float).view(1, 4, 4)  # 0..15: 0.75 quantile = 11.25
    assert torch.allclose(quantile_threshold(cam, 0.75), torch.tensor([11.25]))


def test_fills_replace_only_the_masked_pixels():
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 4, 4).contiguous() + 1
    mask = torch.zeros(4, 4, 4, dtype=torch.bool)
    mask[:, 0, 1] = True
    black = fill_masks(images, mask, "black")
    assert (black[:, :, 0, 1] == 0).all() and torch.equal(black[:, :, 1:], images[:, :, 1:])
    shuffled = fill_masks(images, mask, "shuffle", torch.Generator().manual_seed(0))
    partner = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shuffled[:, :, 0, 1], images[partner][:, :, 0, 1])  # the same pixels of another image
    assert torch.equal(shuffled[:, :, 1:], images[:, :, 1:]) and torch.equal(
        shuffled[:, :, 0, 0], images[:, :, 0, 0]
    )


def test_swap_fill_brings_the_other_images_masked_region():
    """Two images with a marker in different places: each gets the other's marker where its own was."""
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0, :, 0:2, 0:2] = 100  # image 0's marker, top left
    images[1, :, 5:7, 4:6] = 200  # image 1's marker, lower down
    masks = images[:, 0] > 0
    swapping = next(
        s
        for s in range(100)
        if torch.randperm(2, generator=torch.Generator().manual_seed(s)).tolist() == [1, 0]
    )  # a seed that pairs image 0 with image 1 and 1 with 0
    out = fill_masks(images, masks, "swap", torch.Generator().manual_seed(swapping))
    assert (out[0, :, 0:2, 0:2] == 200).all() and (out[1, :, 5:7, 4:6] == 100).all()
    assert torch.equal(out[:, :, ~masks.any(0)], images[:, :, ~masks.any(0)])


def test_random_masks_hide_as_many_pixels_elsewhere():
    masks = torch.zeros(50, 32, 32, dtype=torch.bool)
    for i in range(50):
        masks[i, : i % 8 + 1, : 2 * (i % 5) + 1] = True
    generator = torch.Generator().manual_seed(0)
    random = random_masks_like(masks, generator)
    assert torch.equal(random.flatten(1).sum(1), masks.flatten(1).sum(1))
    for i in range(50):  # the same blob, circularly shifted
        shifted = [torch.roll(masks[i], (dy, dx), (0, 1)) for dy in range(32) for dx in range(32)]
        assert any(torch.equal(random[i], s) for s in shifted)
    overlap = (random & masks).flatten(1).sum(1).float() / masks.flatten(1).sum(1)
    assert overlap.mean() < 0.2  # mostly in other places
    assert torch.equal(random, random_masks_like(masks, torch.Generator().manual_seed(0)))


def test_xgradcam_matches_pytorch_grad_cam():
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import XGradCAM

    torch.manual_seed(0)
    model = VGGWithAttention(10).eval()

    class LogitsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    x = torch.rand(6, 3, 32, 32) * 255  # images on the 0-255 scale: the model normalises them
    reference = XGradCAM(model=LogitsOnly(model), target_layers=[model.attention])(
        input_tensor=x, targets=None
    )
    ours = xgradcam_saliency(model, x)
    low = ours.amin((1, 2), keepdim=True)
    ours = (ours - low) / (1e-7 + (ours - low).amax((1, 2), keepdim=True))  # the package's min-max scaling
    assert np.allclose(ours.numpy(), reference, atol=1e-4)


@pytest.fixture(scope="module")
def planted_model():
    """A VGG trained briefly on images whose class is given only by the position of a bright square."""
    rng = np.random.default_rng(0)
    labels = np.arange(600) % 10
    images = torch.from_numpy(planted_images(labels, rng))
    labels = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, nesterov=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_epoch(model, optimizer, images, labels, generator, batch_size=32, augment=False)
    test_labels = torch.arange(200) % 10
    test_images = torch.from_numpy(planted_images(test_labels.numpy(), rng))
    assert accuracy(predict(model, test_images, batch_size=100), test_labels) > 0.9
    return model, test_images, test_labels


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["attention", "xgradcam"])
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "amp_channels_last"])
def test_masks_cover_the_planted_patch(planted_model, strategy, fast):
    """attention masks a fixed 25% of each image: it must contain the whole square; xgradcam's
    mean + 2 std masks about as many pixels as the square has: most must lie on it (the 8x8 CAM is
    upsampled from 4x4-pixel cells, so its edges blur a little past the square). The same with the scripts'
    speed settings (a bf16 trunk where bf16 is native, NHWC)."""
    model, images, labels = planted_model
    if fast:
        model = prepare_model(copy.deepcopy(model), torch.device("cpu"), channels_last=True)
    masks = compute_masks(model, images, strategy, batch_size=64, amp=fast)
    patch = torch.zeros_like(masks)
    for i, c in enumerate(labels.tolist()):
        row, col = patch_corner(c)
        patch[i, row : row + PATCH, col : col + PATCH] = True
    inside = (masks & patch).flatten(1).sum(1).float()
    precision = inside / masks.flatten(1).sum(1).clamp_min(1)
    recall = inside / PATCH**2
    assert (masks.flatten(1).sum(1) > 0).float().mean() > 0.95
    if strategy == "attention":
        assert (recall > 0.9).float().mean() > 0.8, recall
    else:
        assert (precision > 0.5).float().mean() > 0.9, precision
    # and masking removes much of the evidence: accuracy on masked images drops by 30 points or more
    clean_accuracy = accuracy(predict(model, images, batch_size=100), labels)
    masked_accuracy = accuracy(predict(model, fill_masks(images, masks, "black"), batch_size=100), labels)
    assert masked_accuracy < clean_accuracy - 0.3


def test_saliency_mask_rejects_unknown_strategy():
    from console import UserError

    with pytest.raises(UserError, match="unknown masking .gradcam."):
        saliency_mask(VGGWithAttention(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "gradcam")
    with pytest.raises(UserError, match="unknown mask_fill"):
        fill_masks(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.bool), "grey")
