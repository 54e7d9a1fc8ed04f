import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import PATCH, patch_corner, planted_images
from data import normalize
from engine import accuracy, predict, prepare_model, train_epoch
from masking import (apply_masks, compute_masks, mean_std_threshold, quantile_threshold, random_masks_like,
                     saliency_mask, shuffled_fill, xgradcam_saliency)
from models import VGG_MEAN, VGG_STD, VGGWithAttention

NORM = dict(mean=VGG_MEAN, std=VGG_STD)


def test_mean_std_threshold_matches_hand_computation():
    cam = torch.tensor([[[0.0, 1.0], [2.0, 3.0]],      # positives 1, 2, 3: mean 2, population std sqrt(2/3)
                        [[0.0, 0.0], [0.0, 4.0]],      # one positive: std 0
                        [[0.0, 0.0], [0.0, 0.0]]])     # none positive
    expected = torch.tensor([2 + 2 * (2 / 3) ** 0.5, 4.0, 0.0])
    assert torch.allclose(mean_std_threshold(cam, 2.0), expected)


def test_quantile_threshold_matches_hand_computation():
    cam = torch.arange(16, dtype=torch.float).view(1, 4, 4)  # 0..15: 0.75 quantile = 11.25
    assert torch.allclose(quantile_threshold(cam, 0.75), torch.tensor([11.25]))


def test_apply_masks_blackens_or_attenuates_only_masked_pixels():
    images = torch.full((1, 3, 2, 2), 200, dtype=torch.uint8)
    mask = torch.tensor([[[True, False], [False, False]]])
    assert apply_masks(images, mask, 0.0)[0, :, 0, 0].tolist() == [0, 0, 0]
    assert apply_masks(images, mask, 0.5)[0, :, 0, 0].tolist() == [100, 100, 100]
    assert (apply_masks(images, mask, 0.0)[0, :, 1, 1] == 200).all()


def test_shuffle_fill_copies_another_images_pixels_into_the_mask_only():
    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    fill = shuffled_fill(images, torch.Generator().manual_seed(0))
    assert sorted(fill[:, 0, 0, 0].tolist()) == [0, 1, 2, 3]  # a permutation of the set
    mask = torch.zeros(4, 2, 2, dtype=torch.bool)
    mask[:, 0, 1] = True
    out = apply_masks(images, mask, fill=fill)
    assert torch.equal(out[:, :, 0, 1], fill[:, :, 0, 1])
    assert torch.equal(out[:, :, 1], images[:, :, 1]) and torch.equal(out[:, :, 0, 0], images[:, :, 0, 0])


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

    x = torch.randn(6, 3, 32, 32)
    reference = XGradCAM(model=LogitsOnly(model), target_layers=[model.attention])(input_tensor=x, targets=None)
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
    for epoch in range(6):
        train_epoch(model, optimizer, images, labels, batch_size=32, device=torch.device("cpu"),
                    generator=generator, augment=False, **NORM)
    test_labels = torch.arange(200) % 10
    test_images = torch.from_numpy(planted_images(test_labels.numpy(), rng))
    assert accuracy(predict(model, test_images, batch_size=100, device=torch.device("cpu"), **NORM), test_labels) > 0.9
    return model, test_images, test_labels


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
    masks = compute_masks(model, images, strategy, batch_size=64, device=torch.device("cpu"), amp=fast, **NORM)
    patch = torch.zeros_like(masks)
    for i, c in enumerate(labels.tolist()):
        row, col = patch_corner(c)
        patch[i, row:row + PATCH, col:col + PATCH] = True
    inside = (masks & patch).flatten(1).sum(1).float()
    precision = inside / masks.flatten(1).sum(1).clamp_min(1)
    recall = inside / PATCH ** 2
    assert (masks.flatten(1).sum(1) > 0).float().mean() > 0.95
    if strategy == "attention":
        assert (recall > 0.9).float().mean() > 0.8, recall
    else:
        assert (precision > 0.5).float().mean() > 0.9, precision
    # and masking removes much of the evidence: accuracy on masked images drops by 30 points or more
    clean_accuracy = accuracy(predict(model, images, batch_size=100, device=torch.device("cpu"), **NORM), labels)
    masked = apply_masks(images, masks)
    masked_accuracy = accuracy(predict(model, masked, batch_size=100, device=torch.device("cpu"), **NORM), labels)
    assert masked_accuracy < clean_accuracy - 0.3


def test_saliency_mask_rejects_unknown_strategy():
    from config import UserError
    with pytest.raises(UserError, match="unknown masking strategy"):
        saliency_mask(VGGWithAttention(), normalize(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), **NORM), "gradcam")
