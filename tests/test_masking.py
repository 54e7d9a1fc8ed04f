import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import PATCH, patch_corner, planted_images
from masktune import masking
from masktune.console import UserError
from masktune.device import prepare_model
from masktune.engine import TrainingSet, accuracy, predict, train_epoch
from masktune.masking import (
    CHUNK_ROWS,
    PackedMasks,
    box_filter,
    class_mask_rates,
    complete_flat_regions,
    compute_masks,
    fill_masks,
    gradient_saliency,
    grow_masks,
    integrated_saliency,
    masked_images,
    mean_std_threshold,
    other_class_partners,
    quantile_threshold,
    random_masks_like,
    saliency_mask,
    xgradcam_saliency,
)
from models import Normalized, VGGWithAttention


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


class LinearModel(Normalized):
    """logits = sum over pixels of weight * normalised input: its gradient x input is known exactly."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(mean=(0.2, 0.5, 0.7), std=(0.3, 0.5, 0.2))
        self.weight = nn.Parameter(weight)  # (classes, 3, H, W)

    def forward(self, images):
        return torch.einsum("kchw,nchw->nk", self.weight, self.normalize(images)), None


def test_gradient_saliency_is_gradient_times_normalised_input():
    torch.manual_seed(0)
    model = LinearModel(torch.randn(2, 3, 8, 8))
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    normalised = model.normalize(images)
    logits = model(images)[0]
    contribution = model.weight[logits.argmax(1)].detach() * normalised  # each pixel's share of the logit
    signed = contribution.sum(1)  # summed over the channels, signed: evidence for and against cancels
    expected = signed.clamp_min(0)
    assert (signed < 0).any() and torch.allclose(
        gradient_saliency(model, images, smoothing=0), expected, atol=1e-4
    )
    # box-filtered over round(0.4 * 8) -> 3 pixels: one hot pixel spreads to a 3x3 patch of 1/9
    hot = torch.zeros(1, 8, 8)
    hot[0, 4, 4] = 9.0
    assert torch.equal(box_filter(hot, 3)[0, 3:6, 3:6], torch.ones(3, 3))
    assert box_filter(hot, 3).sum() == 9.0
    smoothed = gradient_saliency(model, images, smoothing=0.4)
    # smoothed before the positive part is taken
    assert torch.allclose(smoothed[:, 2:6, 2:6], box_filter(signed, 3)[:, 2:6, 2:6].clamp_min(0), atol=1e-4)


def test_integrated_saliency_is_the_logit_change_from_the_baseline_per_pixel():
    """On a linear model integrated gradients are exact: each pixel's share of the predicted logit's change
    from the baseline image to the image, whatever the number of steps."""
    torch.manual_seed(0)
    model = LinearModel(torch.randn(2, 3, 8, 8))
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    baselines = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    weight = model.weight[model(images)[0].argmax(1)].detach()  # the predicted class's
    change = (weight * (model.normalize(images) - model.normalize(baselines))).sum(1)
    maps = integrated_saliency(model, images, baselines, smoothing=0)
    assert (change < 0).any() and torch.allclose(maps, change.clamp_min(0), atol=1e-4)
    # multi-label: every label's logit, signed by the image's own prediction, all along the path
    signs = torch.where(model(images)[0] > 0, 1.0, -1.0).detach()
    weight = torch.einsum("nk,kchw->nchw", signs, model.weight.detach())
    change = (weight * (model.normalize(images) - model.normalize(baselines))).sum(1)
    maps = integrated_saliency(model, images, baselines, smoothing=0, multilabel=True)
    assert torch.allclose(maps, change.clamp_min(0), atol=1e-4)
    # without baselines it starts from the model's zero input: gradient x input
    assert torch.allclose(
        integrated_saliency(model, images, smoothing=0), gradient_saliency(model, images, 0)
    )


def partners_of(labels: torch.Tensor) -> torch.Tensor:
    """Each image's partner of another class, drawn as compute_masks' callers draw them."""
    return other_class_partners(labels, torch.Generator().manual_seed(0))


def two_class_images(n: int, region: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``region``'s size whose ``region`` is bright (class 0) or dark (class 1); mid-grey noise
    elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(100, 156, (n, 3, *region.shape), generator=generator, dtype=torch.uint8)
    images[:, :, region] = torch.where(labels == 0, 240, 15).to(torch.uint8).view(-1, 1, 1)
    return images, labels


def test_the_decisive_extent_masks_the_region_the_prediction_follows_at_its_size():
    """A linear model that reads only a 2x2 corner (4 of 64 pixels): the smallest top region that decides
    its prediction is that corner (the 6% candidate), on every image; the mask is the map's top 12%: the
    corner and the (zero-saliency) rest is left out, so the mask is the corner."""
    corner = torch.zeros(8, 8, dtype=torch.bool)
    corner[:2, :2] = True
    weight = torch.zeros(2, 3, 8, 8)
    weight[0, :, corner], weight[1, :, corner] = 3.0, -3.0
    model = LinearModel(weight)
    images, labels = two_class_images(40, corner)
    masks = compute_masks(
        model, images, "gradient", batch_size=16, partners=partners_of(labels), extent="decisive", smoothing=0
    )
    assert (masks == corner).all()


def linear_decisive_masks(weight: torch.Tensor, images, labels, **settings) -> torch.Tensor:
    """The decisive masks of ``LinearModel(weight)`` on ``images`` (gradient map, default smoothing)."""
    partners = partners_of(labels)
    return compute_masks(
        LinearModel(weight),
        images,
        "gradient",
        batch_size=16,
        partners=partners,
        extent="decisive",
        **settings,
    )


@pytest.mark.parametrize("side", [4, 12])
def test_the_widened_decisive_mask_hides_a_marker_of_any_size_whole(side):
    """A linear model that reads only a side x side corner of 32x32 images (2% or 14% of the image): the
    default smoothing blurs the map's edge by 2 pixels (the box filter's half-width), so the region found
    misses the rim of a large marker (without ``widen``); widened by those 2 pixels, the mask hides all of
    the marker, and at most 4 pixels beyond it (the blur's 2 and the widening's 2)."""
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:side, :side] = True
    weight = torch.zeros(2, 3, 32, 32)
    weight[0, :, corner], weight[1, :, corner] = 1.0, -1.0
    images, labels = two_class_images(40, corner)
    masks = linear_decisive_masks(weight, images, labels, widen=True)
    assert (masks & corner).flatten(1).sum(1).eq(side * side).all()
    assert (masks & ~corner).flatten(1).sum(1).le((side + 4) ** 2 - side * side).all()
    if side == 12:
        unwidened = linear_decisive_masks(weight, images, labels)
        assert (unwidened & corner).flatten(1).sum(1).lt(side * side).all()


@pytest.mark.parametrize("side", [4, 12])
def test_the_completed_decisive_mask_hides_a_flat_marker_whole_and_nothing_else(side):
    """The same model and images: with ``complete`` the mask grows through the marker's flat colour, so it
    hides all of the marker, and beyond it exactly what the mask hid before (the noise around it is of
    other colours)."""
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:side, :side] = True
    weight = torch.zeros(2, 3, 32, 32)
    weight[0, :, corner], weight[1, :, corner] = 1.0, -1.0
    images, labels = two_class_images(40, corner)
    found = {c: linear_decisive_masks(weight, images, labels, complete=c) for c in (False, True)}
    assert (found[True] & corner).flatten(1).sum(1).eq(side * side).all()
    assert torch.equal(found[True] & ~corner, found[False] & ~corner)


def test_completing_first_tests_the_region_the_mask_hides(monkeypatch):
    """Only the 3% candidate allowed, and a model that reads a 12x12 marker, most strongly near the image's
    corner: the top 3% of its map is that part of the marker, and kept alone beside the partner's own
    marker (the rest of the corner) it does not decide the prediction, so no image gets a mask. Completed
    before the test, the candidate is the whole marker, which decides it: the mask is exactly the marker."""
    monkeypatch.setattr(masking, "DECISIVE_AREAS", (0.03,))
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:12, :12] = True
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    reading = 1 + (22 - rows - cols) / 44  # 1.5 at the image's corner, 1 at the marker's far corner
    weight = torch.zeros(2, 3, 32, 32)
    weight[0, :, :12, :12], weight[1, :, :12, :12] = reading, -reading
    images, labels = two_class_images(40, corner)
    found = {
        f: linear_decisive_masks(weight, images, labels, complete=True, complete_first=f)
        for f in (False, True)
    }
    assert not found[False].any()
    assert (found[True] == corner).all()


def test_the_class_consensus_hides_a_still_shortcut_whole_where_it_decides():
    """A model that reads only a frame (44% of the image, more than any top region). Half of class 0's
    images have masks, each the frame less one of its sides: every frame pixel is hidden on at least half
    of them, so the class's consensus is the frame, which decides every image's prediction and is added
    to every class-0 mask. Class 1's masks agree on a central block the model does not read: its
    consensus decides nothing and nothing is added."""
    frame = ~F.pad(torch.ones(12, 12, dtype=torch.bool), (2, 2, 2, 2), value=False)
    weight = torch.zeros(2, 3, 16, 16)
    weight[0, :, frame], weight[1, :, frame] = 1.0, -1.0
    images, labels = two_class_images(32, frame)
    sides = [frame.clone() for _ in range(4)]
    sides[0][:2], sides[1][-2:], sides[2][:, :2], sides[3][:, -2:] = False, False, False, False
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[6:10, 6:10] = True
    masks = torch.zeros(32, 16, 16, dtype=torch.bool)
    zeros, ones = (labels == 0).nonzero().flatten(), (labels == 1).nonzero().flatten()
    for i, image in enumerate(zeros[:8]):
        masks[image] = sides[i % 4]
    masks[ones[:4]] = block
    consensus, _ = masking.class_consensus(PackedMasks.pack(masks), labels, 0.5)
    assert torch.equal(consensus[0], frame) and torch.equal(consensus[1], block)
    joined = masking.add_consensus(
        LinearModel(weight), images, PackedMasks.pack(masks), labels, partners_of(labels), 0.5, batch_size=8
    )[:]
    assert (joined[zeros] == frame).all()
    assert torch.equal(joined[ones], masks[ones])


def test_completion_leaves_a_background_colour_and_an_empty_mask_alone():
    """A mask on a flat quarter of the image is completed; on a flat colour over half of it (a background),
    and where nothing is masked, nothing is added."""
    images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
    images[0, :, :4, :4] = 200  # a flat quarter (25%: still rare enough), black elsewhere
    images[1, :, :, :4] = 200  # a flat half
    images[2, :, :4, :4] = 200
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:2, 0, 0] = True
    cam = torch.rand(3, 8, 8)
    completed = complete_flat_regions(masks, images, cam)
    quarter = torch.zeros(8, 8, dtype=torch.bool)
    quarter[:4, :4] = True
    assert torch.equal(completed[0], quarter)
    assert torch.equal(completed[1], masks[1]) and not completed[2].any()


def test_grow_masks_by_a_radius():
    mask = torch.zeros(1, 7, 7, dtype=torch.bool)
    mask[0, 3, 3] = True
    assert torch.equal(grow_masks(mask, 0), mask)
    grown = torch.zeros_like(mask)
    grown[0, 1:6, 1:6] = True
    assert torch.equal(grow_masks(mask, 2), grown)


def test_the_decisive_extent_masks_nothing_where_the_whole_image_decides():
    """A model that adds up every pixel: no region of half the image or less outweighs the rest."""
    everywhere = torch.ones(8, 8, dtype=torch.bool)
    weight = torch.zeros(2, 3, 8, 8)
    weight[0], weight[1] = 0.2, -0.2
    model = LinearModel(weight)
    images, labels = two_class_images(40, everywhere)
    masks = compute_masks(
        model, images, "gradient", batch_size=16, partners=partners_of(labels), extent="decisive", smoothing=0
    )
    assert not masks.any()
    with pytest.raises(UserError, match="needs each image's partner"):
        compute_masks(model, images, "gradient", batch_size=16, extent="decisive")


def test_partners_are_of_another_class():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    partners = other_class_partners(labels, torch.Generator().manual_seed(0))
    assert (labels[partners] != labels).all()
    attributes = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # multi-label: another set of labels
    partners = other_class_partners(attributes, torch.Generator().manual_seed(0))
    assert ((attributes[partners] != attributes).any(1)).all()


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


def test_shuffle_union_fill_unties_a_marker_that_one_class_carries():
    """Class 0 carries a marker that its masks cover; class 1 has none and nothing salient there. Filling
    only each image's own mask leaves the marker on class 0 alone (on half of them); filling both images'
    masks gives it to half of either class."""
    labels = torch.arange(1000) % 2
    images = torch.zeros(1000, 3, 8, 8, dtype=torch.uint8)
    images[labels == 0, :, :2, :2] = 255
    masks = images[:, 0] > 0
    for fill, gap in (("shuffle", (0.4, 0.6)), ("shuffle_union", (-0.1, 0.1))):
        filled = fill_masks(images, masks, fill, torch.Generator().manual_seed(0))
        marked = (filled[:, 0, :2, :2] == 255).all((1, 2)).float()
        assert ((filled[:, 0, :2, :2] == 255) | (filled[:, 0, :2, :2] == 0)).all()  # whole markers or none
        difference = marked[labels == 0].mean() - marked[labels == 1].mean()
        assert gap[0] < difference < gap[1], (fill, difference)
        assert 0.4 < marked[labels == 0].mean() < 0.6
        assert torch.equal(filled[:, :, 2:], images[:, :, 2:])  # nothing changes outside the masks


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


@pytest.mark.parametrize("width", [8, 13, 32])
def test_packed_masks_hold_every_pixel_in_an_eighth_of_the_memory(width):
    masks = torch.rand(CHUNK_ROWS + 5, 6, width, generator=torch.Generator().manual_seed(width)) < 0.3
    packed = PackedMasks.pack(masks)
    assert packed.bits.dtype == torch.uint8 and packed.bits.shape == (len(masks), 6, -(-width // 8))
    assert packed.shape == masks.shape and torch.equal(packed[:], masks)
    index = torch.tensor([3, 0, CHUNK_ROWS + 4])
    assert torch.equal(packed[index], masks[index])
    assert packed.fraction() == masks.sum().item() / masks.numel()
    assert PackedMasks.empty(4, 6, width, masks.device).fraction() == 0
    # the random-mask control moves packed masks (chunk by chunk) exactly as it moves bool ones
    moved = random_masks_like(packed, torch.Generator().manual_seed(1))
    assert torch.equal(moved[:], random_masks_like(masks, torch.Generator().manual_seed(1)))
    # the masks of two rounds add up pixel by pixel
    other = torch.rand(masks.shape, generator=torch.Generator().manual_seed(2)) < 0.3
    assert torch.equal((packed | PackedMasks.pack(other))[:], masks | other)


def test_a_further_round_keeps_only_the_pixels_near_the_masks_so_far():
    """A 12x12 marker's rim (next to the first round's mask) stays; a region across the image goes."""
    first = torch.zeros(2, 32, 32, dtype=torch.bool)
    first[0, 22:30, 2:10] = True  # the marker's middle; the second image has no mask yet
    more = torch.zeros(2, 32, 32, dtype=torch.bool)
    more[:, 20:32, 0:12] = True  # the marker's rim, two pixels wide
    more[:, 2:8, 20:26] = True  # the object, far from the marker
    near = PackedMasks.pack(more).near(PackedMasks.pack(first), 3)[:]
    expected = torch.zeros_like(more)
    expected[0, 20:32, 0:12] = True  # every rim pixel is within 2 of the middle
    assert torch.equal(near, expected)


@pytest.mark.parametrize("fill", ["shuffle_union", "shuffle", "swap", "black"])
def test_the_per_batch_fill_equals_the_filled_copy_image_for_image(fill):
    """What a fine-tune draws batch by batch (packed masks, gathered per batch) equals the filled set."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 12, 12), dtype=torch.uint8, generator=generator)
    masks = torch.rand(40, 12, 12, generator=generator) < 0.2
    whole = fill_masks(images, masks, fill, torch.Generator().manual_seed(5))
    view = masked_images(images, PackedMasks.pack(masks), fill, torch.Generator().manual_seed(5))
    for index in torch.randperm(40, generator=generator).split(7):
        assert torch.equal(view[index], whole[index])


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
        train_epoch(
            model, optimizer, TrainingSet(images, labels, F.cross_entropy, 32, augment=False), generator
        )
    test_labels = torch.arange(200) % 10
    test_images = torch.from_numpy(planted_images(test_labels.numpy(), rng))
    assert accuracy(predict(model, test_images, batch_size=100), test_labels) > 0.9
    return model, test_images, test_labels


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["gradient", "integrated", "attention", "xgradcam"])
@pytest.mark.parametrize("fast", [False, True], ids=["fp32", "amp_channels_last"])
def test_masks_cover_the_planted_patch(planted_model, strategy, fast):
    """gradient and attention mask a fixed 25% of each image: it must contain the whole square; xgradcam's
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
    if strategy != "xgradcam":
        assert (recall > 0.9).float().mean() > 0.8, recall
    else:
        assert (precision > 0.5).float().mean() > 0.9, precision
    # and masking removes much of the evidence: accuracy on masked images drops by 30 points or more
    clean_accuracy = accuracy(predict(model, images, batch_size=100), labels)
    masked_accuracy = accuracy(predict(model, fill_masks(images, masks, "black"), batch_size=100), labels)
    assert masked_accuracy < clean_accuracy - 0.3


def test_saliency_mask_rejects_unknown_strategy():
    with pytest.raises(UserError, match="unknown masking .gradcam."):
        saliency_mask(VGGWithAttention(), torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "gradcam")
    with pytest.raises(UserError, match="unknown mask_fill"):
        fill_masks(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 2, 2, dtype=torch.bool), "grey")


def test_class_mask_rates_count_the_masked_images_of_each_class():
    """Class 0: 3 of its 4 images masked, class 1: 1 of 4; bool masks, packed ones and multi-label rows
    (each distinct row a class, in sorted order) alike."""
    masks = torch.zeros(8, 4, 4, dtype=torch.bool)
    masks[[0, 2, 3, 4], 1, 1] = True
    labels = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1])
    rows = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[labels]  # sorted as the labels
    for found in (masks, PackedMasks.pack(masks)):
        for classes in (labels, rows):
            assert class_mask_rates(found, classes).tolist() == [0.75, 0.25]


def test_the_class_share_is_judged_before_the_consensus_is_added(monkeypatch):
    """Each image's own masks cover 40% of class 0 and none of class 1; a consensus would cover every
    image. Under ``mask_class_share=0.5`` the masks are dropped, and the consensus is never computed: a
    consensus as large as a class's centred objects would pass as they do. At 0.4 the masks are kept and
    the consensus is added."""
    from masktune import pipeline
    from masktune.images import ImageSet

    labels = torch.arange(20) % 2
    own = torch.zeros(20, 8, 8, dtype=torch.bool)
    own[torch.tensor([0, 2, 4, 6]), :2, :2] = True  # 4 of class 0's 10 images
    monkeypatch.setattr(pipeline, "compute_masks", lambda *a, **k: PackedMasks.pack(own))
    calls = []

    def everything(model, images, masks, *a, **k):
        calls.append(True)
        return PackedMasks.pack(torch.ones(20, 8, 8, dtype=torch.bool))

    monkeypatch.setattr(pipeline, "add_consensus", everything)
    images = ImageSet(torch.zeros(20, 3, 8, 8, dtype=torch.uint8), labels, ["a", "b"])
    config = {
        "device_data_gb": 0,
        "num_epochs": 1,
        "finetune_epochs": 1,
        "batch_size": 4,
        "finetune_min_steps": 0,
        "seed": 0,
        "masking": "integrated",
        "eval_batch_size": 8,
        "amp": False,
        "mask_consensus": 0.3,
        "mask_extent": "decisive",
        "mask_class_share": 0.5,
        "mask_quantile": 0.9,
        "mask_std": 2.0,
        "gradient_smoothing": 0.15,
    }
    run = pipeline.Run(config, torch.device("cpu"), images, images, images, F.cross_entropy, "vgg")
    assert run.masks_of(nn.Identity(), "masking").fraction() == 0 and not calls
    assert run.class_mask_rates == pytest.approx([0.4, 0.0])
    run.config = config | {"mask_class_share": 0.4}
    assert run.masks_of(nn.Identity(), "masking").fraction() == 1 and calls
