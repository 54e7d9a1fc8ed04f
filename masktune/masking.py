"""Saliency maps, how much of each map to mask, and the fills, all as batched tensor code.

Saliency maps (``masking``):
  gradient   gradient x input of the predicted class's logit (the input measured from the model's
             normalisation mean, its zero input), summed over the colour channels, box-filtered over
             ``smoothing`` of the image side, positive part: what the prediction depends on, so it finds a
             small marker that the model follows even where the true object draws more activation
  integrated (the scripts' default) integrated gradients of the predicted class's logit, from the decisive
             test's partner image (other extents: from the zero input) to the image, ``INTEGRATED_STEPS``
             steps, smoothed as gradient: the evidence along the whole way from another class's image, not
             only at the image, where a marker's pull may have saturated (the 12x12 square: 91% of it
             hidden, against 77%; biased MNIST: the square, not the digit beside it)
  attention  the report's: channel mean of the model's attention map (its last conv block), upsampled to
             the input size, min-max normalised per image. Where the model looks.
  xgradcam   the paper's: XGradCAM of the predicted class on the last conv block, upsampled.
How much of a map is masked (``mask_extent``):
  decisive   per image, the smallest of the map's top regions (``DECISIVE_AREAS``: 3% to a quarter of the
             image) that the prediction follows: kept alone, with the rest of the image taken from a
             partner image of another class, the predicted class keeps ``DECISIVE_MARGIN`` more
             probability than with the region replaced by the partner's pixels. A marker is found at
             its own size; an image whose prediction follows no such region (what a clean image's object
             usually gives: on plain CIFAR-10 about one image in twenty) gets no mask, so the fine-tune
             sees it unchanged and cannot be damaged by it. With ``widen`` (off by default) each mask
             then grows by the gradient map's box-filter half-width: the blur puts the threshold's edge
             inside a large marker, whose rim stays in view and is what the fine-tune then learns (the
             12x12 square: 75% of it hidden, 95% widened); on a small one the wider mask only hides
             more of the object (see RESULTS.md).
  complete   (``mask_complete``) each decisive mask then grows through the connected pixels of the colour
             of its most salient pixel, where that colour covers at most a quarter of the image: the box
             filter puts the threshold inside a large flat marker, and the fine-tune would learn the rim
             left in view (the 12x12 square: 53% of it hidden, 69% completed). A background colour
             (MNIST's black) is too common to grow through. With ``complete_first`` (the scripts' default)
             each candidate region is completed before the test, so that the test judges the region the
             mask will hide: a large marker whole, rather than its blurred core beside the partner's marker.
  consensus  (``mask_consensus``, 0.3 by default; ``add_consensus``) each class's consensus, the pixels
             hidden on at least that share of its masked images, is tested on every image of the class
             with the decisive test and added where it decides. A still shortcut larger than any top
             region (the frame: 34% of the image) is hidden a part at a time on a third of the images;
             the parts agree, and the consensus hides more of it (seed 0: 59% of the frame at 0.3, 22%
             without). A moving marker leaves no consensus. It is added only where ``shared`` kept the
             masks: CIFAR-10's objects sit near the centre, so a class's masks also agree there, and
             tested on every image that central blob decides as the objects do, on many more of them
             (a whole-image grain: 57% of a class's images, against at most 32% for each image's own region).
  rounds     (``mask_rounds`` > 1, off by default; ``pipeline.Run.masks``) fine-tune on the masks, then add
             the fine-tuned model's masks: what it learned in place of the masked pixels (a large marker's
             rim). ``mask_round_reach`` keeps only the added pixels near the masks so far
             (``PackedMasks.near``), so that a digit or an object elsewhere is not masked too.
  shared     (``mask_class_share``; ``pipeline.Run.masks_of``) the masks are kept only where a region
             decides the prediction on at least that share of some class's training images (the scripts:
             half): a shortcut is shared by most of a class's images, while a region that decides a few
             images of every class is their object (plain CIFAR-10: at most 23% of a class's images with
             integrated maps; the squares and biased MNIST: 56-99%). Hiding a few objects, or a sliver of a
             frame, only teaches what surrounds them; without the masks the fine-tune is the no-mask
             control's. The share counts each image's own region, before the consensus is added.
  fixed      the map's own threshold: above the per-image ``quantile`` (gradient, attention), above mean +
             ``num_std`` std of the positive CAM (xgradcam: the paper's).
A mask is a bool tensor (N, H, W), True where a pixel is hidden, or a training set's ``PackedMasks`` (eight
pixels to a byte); ``random_masks_like`` moves each mask to a random place (the random-mask control).
``fill_masks`` replaces the masked pixels: black as in the paper, or from a random other image
(``shuffle_union``, ``shuffle``, ``swap``).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from masktune.batches import in_order
from masktune.console import check, check_choice, progress
from masktune.device import autocast, model_device
from masktune.distributed import gather_rows, my_range

STRATEGIES = ("gradient", "integrated", "attention", "xgradcam")
EXTENTS = ("decisive", "fixed")
DECISIVE_AREAS = (0.03, 0.06, 0.12, 0.25)  # candidate masks: these shares of the image, smallest first
DECISIVE_MARGIN = 0.5  # how much more probability the prediction keeps with the region than without it
FLAT_TOLERANCE = 8  # complete: pixels within this (of 255, in every channel) share the mask's colour
FLAT_RARITY = 0.25  # complete: a colour over more of the image than this is a background, not a marker
INTEGRATED_STEPS = 4  # integrated: gradients averaged at this many points on the way from the baseline
BOX_FILTERED = ("gradient", "integrated")  # the maps smoothed by ``box_filter`` (what ``widen`` undoes)


def trunk_features(model: nn.Module, inputs: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """The last conv block's activations, without autograd; with ``amp`` the trunk (nearly all the compute)
    runs in bf16 where that is native, and the activations come back in fp32 for the saliency arithmetic."""
    with torch.no_grad(), autocast(inputs.device, amp):
        return model.features(inputs).float()


def attention_saliency(model: nn.Module, inputs: torch.Tensor, amp: bool = False) -> torch.Tensor:
    """Channel-mean attention map upsampled to the input size, min-max normalised per image: (B, H, W)."""
    with torch.no_grad():
        cam = trunk_features(model, inputs, amp).mean(1, keepdim=True)
        cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        low = cam.amin((1, 2), keepdim=True)
        high = cam.amax((1, 2), keepdim=True)
        return (cam - low) / (high - low).clamp_min(1e-12)


def explained_score(logits: torch.Tensor, targets: torch.Tensor | None, multilabel: bool) -> torch.Tensor:
    """The score a saliency map explains, summed over the batch: the target (default: predicted) class's
    logit, or for multi-label logits the evidence for every target (default: predicted) label (+logit for
    present, -logit for absent attributes; targets: bool). Each logit depends only on its own image (eval
    mode), so one backward pass gives every image's gradient."""
    if multilabel:
        present = logits.detach() > 0 if targets is None else targets
        return (logits * torch.where(present, 1.0, -1.0)).sum()
    if targets is None:
        targets = logits.argmax(1)
    return logits.gather(1, targets.view(-1, 1)).sum()


def box_filter(maps: torch.Tensor, side: int) -> torch.Tensor:
    """(B, H, W) maps averaged over a side x side window around each pixel (the border averages what it
    has)."""
    return F.avg_pool2d(maps[:, None], side, stride=1, padding=side // 2, count_include_pad=False)[:, 0]


def gradient_saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    smoothing: float = 0.15,
    multilabel: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Gradient x input of the predicted class's logit, summed over the colour channels, box-filtered over
    ``smoothing`` of the image side (an odd number of pixels), then its positive part: (B, H, W), >= 0. Each
    pixel's share of the logit, signed, so that evidence spread thinly over a region adds up while a region
    whose pixels push both ways cancels. The input is measured from 255 * the model's normalisation mean, so
    the map is gradient x input in the model's own (normalised) input space."""
    pixels = inputs.float().requires_grad_(True)
    with torch.enable_grad(), autocast(inputs.device, amp):
        logits = model(pixels)[0]
        (grads,) = torch.autograd.grad(explained_score(logits.float(), None, multilabel), pixels)
    contribution = (grads * (pixels.detach() - 255 * model.mean)).sum(1)
    return box_filter(contribution, smoothing_side(smoothing, inputs)).clamp_min(0)


def integrated_saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    baselines: torch.Tensor | None = None,
    smoothing: float = 0.15,
    multilabel: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Integrated gradients of the predicted class's logit from ``baselines`` (uint8 images; default the
    model's zero input, its normalisation mean) to ``inputs``, ``INTEGRATED_STEPS`` midpoints, summed over
    the colour channels, box-filtered and clamped as ``gradient_saliency``: (B, H, W), >= 0. From the
    decisive test's partner image, each pixel's share of the change from the partner's prediction to this
    image's: the evidence of a region the partner lacks (a large marker, a frame) adds up along the way."""
    pixels = inputs.float()
    if baselines is None:
        baselines = (255 * model.mean).expand_as(pixels)
    difference = pixels - baselines.float()
    predicted = predicted_labels(model, pixels, multilabel, amp)  # the input's, explained all along the path
    total = torch.zeros_like(pixels)
    for step in range(INTEGRATED_STEPS):
        point = (pixels - (1 - (step + 0.5) / INTEGRATED_STEPS) * difference).requires_grad_(True)
        with torch.enable_grad(), autocast(inputs.device, amp):
            logits = model(point)[0].float()
            (grads,) = torch.autograd.grad(explained_score(logits, predicted, multilabel), point)
        total += grads
    contribution = (total / INTEGRATED_STEPS * difference).sum(1)
    return box_filter(contribution, smoothing_side(smoothing, inputs)).clamp_min(0)


def smoothing_side(smoothing: float, inputs: torch.Tensor) -> int:
    """The gradient map's box-filter side: ``smoothing`` of the image side, rounded to an odd number."""
    return round(smoothing * min(inputs.shape[-2:])) // 2 * 2 + 1


def grow_masks(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """bool (B, H, W) masks grown by ``radius`` pixels in every direction (a square dilation)."""
    if radius == 0:
        return masks
    return F.max_pool2d(masks[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0].bool()


def xgradcam_saliency(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor | None = None,
    multilabel: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """XGradCAM (Fu et al. 2020) of ``targets`` (default: predicted class) for a batch: (B, H, W), >= 0.
    For multi-label logits (``multilabel``) see ``explained_score``.

    w_k = sum_ij(dY/dA_k * A_k) / (sum_ij A_k + eps); CAM = ReLU(sum_k w_k A_k), bilinearly upsampled.
    The backward pass only runs through the head (in fp32): the trunk runs without autograd.
    """
    feature_map = trunk_features(model, inputs, amp)
    with torch.enable_grad():
        feature_map.requires_grad_(True)
        logits = model.head(feature_map)
        (grads,) = torch.autograd.grad(explained_score(logits, targets, multilabel), feature_map)
    feature_map = feature_map.detach()
    weights = (grads * feature_map).sum((2, 3)) / (feature_map.sum((2, 3)) + 1e-7)
    cam = F.relu((weights[:, :, None, None] * feature_map).sum(1, keepdim=True))
    return F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def mean_std_threshold(cam: torch.Tensor, num_std: float = 2.0) -> torch.Tensor:
    """Per image: mean + num_std * std (population) over the pixels with cam > 0; (B,)."""
    positive = (cam > 0).float()
    count = positive.sum((1, 2)).clamp_min(1)
    mean = (cam * positive).sum((1, 2)) / count
    var = (((cam - mean[:, None, None]) ** 2) * positive).sum((1, 2)) / count
    return mean + num_std * var.sqrt()


def quantile_threshold(cam: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per image: the ``quantile`` of its pixel values; (B,)."""
    return torch.quantile(cam.flatten(1), quantile, dim=1)


def mask_settings(config: dict) -> dict:
    """A run's masking settings (``mask_extent``, ``mask_widen``, ``mask_quantile``, ``mask_std``,
    ``gradient_smoothing`` in vgg.py and resnet50.py), checked, as the keyword arguments of ``saliency_mask``
    and ``compute_masks``."""
    check_choice("mask_extent", config["mask_extent"], EXTENTS)
    check(0 < config["mask_quantile"] < 1, "mask_quantile must be between 0 and 1")
    check(0 <= config["gradient_smoothing"] <= 1, "gradient_smoothing must be between 0 and 1")
    return dict(
        extent=config["mask_extent"],
        widen=config.get("mask_widen", False),  # runs from before the setting did not widen
        complete=config.get("mask_complete", False),  # nor complete, nor complete first
        complete_first=config.get("mask_complete_first", False),
        quantile=config["mask_quantile"],
        num_std=config["mask_std"],
        smoothing=config["gradient_smoothing"],
    )


def saliency_map(
    model: nn.Module,
    inputs: torch.Tensor,
    strategy: str,
    *,
    smoothing: float = 0.15,
    multilabel: bool = False,
    amp: bool = False,
    baselines: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``strategy``'s saliency map of a batch of uint8 images: (B, H, W), >= 0. ``baselines``: the
    images integrated gradients start from (the decisive test's partners)."""
    check_choice("masking", strategy, STRATEGIES)
    if strategy == "gradient":
        return gradient_saliency(model, inputs, smoothing, multilabel, amp)
    if strategy == "integrated":
        return integrated_saliency(model, inputs, baselines, smoothing, multilabel, amp)
    if strategy == "attention":
        return attention_saliency(model, inputs, amp)
    return xgradcam_saliency(model, inputs, multilabel=multilabel, amp=amp)


def top_region(cam: torch.Tensor, area: float) -> torch.Tensor:
    """bool (B, H, W): each map's top ``area`` share of pixels (ties and zeros excluded)."""
    return (cam > quantile_threshold(cam, 1 - area)[:, None, None]) & (cam > 0)


def predicted_labels(model: nn.Module, inputs: torch.Tensor, multilabel: bool, amp: bool) -> torch.Tensor:
    """The model's predictions, without autograd: classes (B,), or multi-label 0/1 predictions (B, L) bool."""
    with torch.no_grad(), autocast(inputs.device, amp):
        logits = model(inputs)[0].float()
    return logits > 0 if multilabel else logits.argmax(1)


def prediction_kept(
    model: nn.Module, inputs: torch.Tensor, predicted: torch.Tensor, multilabel: bool, amp: bool
) -> torch.Tensor:
    """(B,) the probability the model gives its earlier ``predicted`` class (multi-label: the mean
    probability of its earlier 0/1 predictions)."""
    with torch.no_grad(), autocast(inputs.device, amp):
        logits = model(inputs)[0].float()
    if multilabel:
        return torch.where(predicted, logits, -logits).sigmoid().mean(1)
    return logits.softmax(1).gather(1, predicted[:, None])[:, 0]


def region_decides(
    model: nn.Module,
    inputs: torch.Tensor,
    partners: torch.Tensor,
    region: torch.Tensor,
    predicted: torch.Tensor,
    multilabel: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """bool (B,): whether each image's prediction follows its ``region`` (B, H, W) against its partner: kept
    alone (the rest from the partner), the ``predicted`` class keeps ``DECISIVE_MARGIN`` more probability
    than with the region replaced by the partner's pixels. The second test runs only where it can pass."""
    region = region[:, None]
    kept = prediction_kept(model, torch.where(region, inputs, partners), predicted, multilabel, amp)
    decides = torch.zeros_like(kept, dtype=torch.bool)
    candidates = (kept >= DECISIVE_MARGIN).nonzero().flatten()  # replaced >= 0: the others cannot pass
    replaced = prediction_kept(
        model,
        torch.where(region[candidates], partners[candidates], inputs[candidates]),
        predicted[candidates],
        multilabel,
        amp,
    )
    decides[candidates] = kept[candidates] - replaced >= DECISIVE_MARGIN
    return decides


def decisive_masks(
    model: nn.Module,
    inputs: torch.Tensor,
    partners: torch.Tensor,
    cam: torch.Tensor,
    multilabel: bool = False,
    amp: bool = False,
    complete: bool = False,
) -> torch.Tensor:
    """Per image, the smallest top region of ``cam`` (``DECISIVE_AREAS``) that the prediction follows against
    a ``partners`` image of another class (see the module docstring); no mask where none does. Each area
    is tested only on the images still without a mask, and the region replaced
    only where the region kept alone holds enough probability to pass. With ``complete`` each region is
    completed (``complete_flat_regions``) before it is tested."""
    predicted = predicted_labels(model, inputs, multilabel, amp)
    masks = torch.zeros_like(cam, dtype=torch.bool)
    open_ = torch.arange(len(cam), device=cam.device)  # the images still without a mask
    for area in DECISIVE_AREAS:
        x = inputs[open_]
        region = top_region(cam[open_], area)
        if complete:
            region = complete_flat_regions(region, x, cam[open_])
        passed = region_decides(model, x, partners[open_], region, predicted[open_], multilabel, amp)
        passed = passed.nonzero().flatten()
        if len(passed):  # at its own area: twice it cost the 4x4 square and MNIST 4-10 points (validation)
            masks[open_[passed]] = region[passed]
        still_open = torch.ones(len(open_), dtype=torch.bool, device=cam.device)
        still_open[passed] = False
        open_ = open_[still_open]
        if len(open_) == 0:
            break
    return masks


def class_index(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each image's class as an index (N,) on ``device``, in the order of ``torch.unique(labels)``
    (multi-label: each distinct set of labels is a class)."""
    return torch.unique(labels.to(device), dim=0, return_inverse=True)[1]


def class_mask_rates(masks: "torch.Tensor | PackedMasks", labels: torch.Tensor) -> torch.Tensor:
    """Per class, the share of its images with a mask: (classes,), in the order of ``torch.unique(labels)``
    (multi-label: each distinct set of labels is a class)."""
    bits = masks.bits if isinstance(masks, PackedMasks) else masks
    group = class_index(labels, bits.device)
    return torch.bincount(group, weights=bits.flatten(1).any(1).float()) / torch.bincount(group)


def class_consensus(
    masks: "PackedMasks", labels: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class (multi-label: per distinct set of labels), the pixels hidden on at least ``share`` of its
    masked images: bool (classes, H, W), none for a class without masks; and each image's class index
    (N,)."""
    group = class_index(labels, masks.device)
    classes = int(group.max()) + 1 if len(group) else 0
    hidden = torch.zeros(classes, *masks.shape[1:], device=masks.device)
    masked = torch.zeros(classes, device=masks.device)
    for i in range(0, len(masks), CHUNK_ROWS):
        rows, g = masks[i : i + CHUNK_ROWS], group[i : i + CHUNK_ROWS]
        some = rows.flatten(1).any(1)
        hidden.index_add_(0, g[some], rows[some].float())
        masked += torch.bincount(g[some], minlength=classes)
    consensus = (hidden >= share * masked[:, None, None]) & (masked[:, None, None] > 0)
    return consensus, group


def add_consensus(
    model: nn.Module,
    images: torch.Tensor,
    masks: "PackedMasks",
    labels: torch.Tensor,
    partners: torch.Tensor,
    share: float,
    *,
    batch_size: int,
    multilabel: bool = False,
    amp: bool = False,
    desc: str = "consensus",
) -> "PackedMasks":
    """``masks`` with each image's class consensus (``class_consensus`` at ``share``) added where that
    region decides the image's prediction against its partner (``region_decides``; ``partners``: indices
    into ``images``). A shortcut that sits still but is larger than any top region (a frame) is hidden a
    part at a time on a few images; where those parts agree, the consensus is the whole of it, tested on
    every image."""
    regions, group = class_consensus(masks, labels, share)

    def joined(rows: torch.Tensor, inputs: torch.Tensor, paired: torch.Tensor) -> torch.Tensor:
        region = regions[group[rows.to(group.device)]].to(inputs.device)
        predicted = predicted_labels(model, inputs, multilabel, amp)
        decides = region_decides(model, inputs, paired, region, predicted, multilabel, amp)
        return masks[rows.to(masks.device)].to(inputs.device) | (region & decides[:, None, None])

    return masks_by_batch(model, images, joined, batch_size=batch_size, partners=partners, desc=desc)


def complete_flat_regions(masks: torch.Tensor, inputs: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Each (B, H, W) mask grown through the connected pixels of its most salient pixel's colour (within
    ``FLAT_TOLERANCE``), where that colour covers at most ``FLAT_RARITY`` of the image: a flat-coloured
    marker's rim, which the blurred map left below the threshold. A background colour, and an image
    without a mask, stay as they are."""
    rows = torch.arange(len(masks), device=masks.device)
    peak = torch.where(masks, cam, -1.0).flatten(1).argmax(1)
    colour = inputs.flatten(2)[rows, :, peak].float()  # (B, C)
    same = (inputs.float() - colour[:, :, None, None]).abs().amax(1) <= FLAT_TOLERANCE
    rare = same.flatten(1).float().mean(1) <= FLAT_RARITY
    same &= (rare & masks.flatten(1).any(1))[:, None, None]
    for _ in range(max(masks.shape[-2:])):  # one pixel further each time, until nothing is added
        grown = masks | (grow_masks(masks, 1) & same)
        if torch.equal(grown, masks):
            break
        masks = grown
    return masks


def saliency_mask(
    model: nn.Module,
    inputs: torch.Tensor,
    strategy: str,
    *,
    extent: str = "fixed",
    widen: bool = False,
    complete: bool = False,
    complete_first: bool = False,
    partners: torch.Tensor | None = None,
    quantile: float = 0.75,
    num_std: float = 2.0,
    smoothing: float = 0.15,
    multilabel: bool = False,
    amp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heatmap, mask) for a batch of uint8 images; mask is True where pixels are hidden. ``partners``: the
    images the decisive extent tests each region against; ``widen``: see the module docstring. ``amp``: bf16
    where native (see ``trunk_features``)."""
    check_choice("mask_extent", extent, EXTENTS)
    cam = saliency_map(
        model, inputs, strategy, smoothing=smoothing, multilabel=multilabel, amp=amp, baselines=partners
    )
    if extent == "decisive":
        check(partners is not None, "the decisive mask extent needs partner images")
        masks = decisive_masks(model, inputs, partners, cam, multilabel, amp, complete and complete_first)
        if widen and strategy in BOX_FILTERED:  # the rim the box filter blurred below the threshold
            masks = grow_masks(masks, smoothing_side(smoothing, inputs) // 2)
        if complete and not complete_first:
            masks = complete_flat_regions(masks, inputs, cam)
        return cam, masks
    if strategy == "xgradcam":
        threshold = mean_std_threshold(cam, num_std)
    else:
        threshold = quantile_threshold(cam, quantile)
    return cam, (cam > threshold[:, None, None]) & (cam > 0)


BIT_VALUES = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # a byte's pixels, first first
CHUNK_ROWS = 4096  # masks unpacked at a time by whole-set operations, to keep their memory small


@dataclass
class PackedMasks:
    """Masks (N, H, W) stored eight pixels to a byte: a training set's masks take an eighth of a bool tensor
    (CelebA's 162,770 at 224x224: 1 GB instead of 8). ``masks[index]`` unpacks the rows at ``index`` as a
    bool tensor (True: hidden); ``masks[:]`` all of them."""

    bits: torch.Tensor  # (N, H, ceil(W / 8)) uint8
    width: int

    @staticmethod
    def pack(masks: torch.Tensor) -> "PackedMasks":
        n, height, width = masks.shape
        padded = F.pad(masks.to(torch.uint8), (0, -width % 8)).view(n, height, -1, 8)
        return PackedMasks((padded * BIT_VALUES.to(masks.device)).sum(-1, dtype=torch.uint8), width)

    @staticmethod
    def empty(n: int, height: int, width: int, device: torch.device) -> "PackedMasks":
        """``n`` masks that hide nothing."""
        return PackedMasks(torch.zeros(n, height, -(-width // 8), dtype=torch.uint8, device=device), width)

    def __len__(self) -> int:
        return len(self.bits)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.bits), self.bits.shape[1], self.width)

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def to(self, device: torch.device) -> "PackedMasks":
        return PackedMasks(self.bits.to(device), self.width)

    def __getitem__(self, index) -> torch.Tensor:
        bits = self.bits[index]
        unpacked = (bits[..., None] & BIT_VALUES.to(bits.device)) != 0
        return unpacked.flatten(-2)[..., : self.width]

    def __or__(self, other: "PackedMasks") -> "PackedMasks":
        """The pixels hidden by either."""
        return PackedMasks(self.bits | other.bits, self.width)

    def near(self, other: "PackedMasks", pixels: int) -> "PackedMasks":
        """The pixels of these masks within ``pixels`` (in both directions) of a pixel ``other`` hides."""
        kernel = 2 * pixels + 1
        rows = []
        for i in range(0, len(self), CHUNK_ROWS):
            hidden = other[i : i + CHUNK_ROWS][:, None].float()
            around = F.max_pool2d(hidden, kernel, stride=1, padding=pixels)[:, 0] > 0
            rows.append(PackedMasks.pack(self[i : i + CHUNK_ROWS] & around).bits)
        return PackedMasks(torch.cat(rows), self.width)

    def fraction(self) -> float:
        """The share of pixels hidden, over every mask."""
        ones = sum(self[i : i + CHUNK_ROWS].sum().item() for i in range(0, len(self), CHUNK_ROWS))
        return ones / max(1, math.prod(self.shape))


def other_class_partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each image a random other image with another label (multi-label: another set of labels), by
    index: (N,) int64. Where every image has the same label, some partners share it."""
    labels = labels.cpu()
    n = len(labels)
    partners = torch.randint(n, (n,), generator=generator)
    for _ in range(100):  # redraw the partners that share the label; each round keeps 1/C of them
        same = labels[partners] == labels
        same = same.flatten(1).all(1) if same.dim() > 1 else same
        if not same.any():
            break
        partners[same] = torch.randint(n, (int(same.sum()),), generator=generator)
    return partners


def masks_by_batch(
    model: nn.Module,
    images: torch.Tensor,
    mask_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    *,
    batch_size: int,
    partners: torch.Tensor | None = None,
    desc: str = "masking",
    packed: bool = True,
) -> torch.Tensor | PackedMasks:
    """``mask_batch(rows, inputs, paired)`` over a whole uint8 image tensor, a batch at a time, with
    ``model`` frozen: bool (N, H, W) masks on the images' device, or with ``packed`` a ``PackedMasks`` (an
    eighth of the memory). ``rows`` index ``images``; ``paired`` are the ``partners`` of ``inputs`` (None
    without). Under torchrun each process masks a contiguous share and every process gets all the masks."""
    was_training = model.training
    model.eval()  # frozen: no weight changes, no dropout; gradients are taken w.r.t. activations only
    device = model_device(model)
    mine = my_range(len(images))
    height, width = images.shape[-2:]
    if packed:
        masks = PackedMasks.empty(len(mine), height, width, images.device).bits
    else:
        masks = torch.empty(len(mine), height, width, dtype=torch.bool, device=images.device)
    try:
        for index in progress(in_order(len(mine), batch_size), desc=desc):
            rows = (index + mine.start).to(images.device)
            inputs = images[rows].to(device, non_blocking=True)
            paired = None if partners is None else images[partners[rows.cpu()].to(images.device)].to(device)
            mask = mask_batch(rows, inputs, paired)
            mask = PackedMasks.pack(mask).bits if packed else mask
            masks[index.to(images.device)] = mask.to(images.device)
    finally:
        model.train(was_training)
    masks = gather_rows(masks, len(images))
    return PackedMasks(masks, width) if packed else masks


def compute_masks(
    model: nn.Module,
    images: torch.Tensor,
    strategy: str,
    *,
    batch_size: int,
    partners: torch.Tensor | None = None,
    desc: str = "masking",
    packed: bool = False,
    **settings,
) -> torch.Tensor | PackedMasks:
    """Masks for a whole uint8 image tensor from a frozen model (see ``masks_by_batch``); ``settings`` as
    for ``saliency_mask``. The decisive extent tests each image against its partner, of another class
    (``partners``: indices into ``images``, from ``other_class_partners``)."""
    decisive = settings.get("extent") == "decisive"
    check(partners is not None or not decisive, "the decisive mask extent needs each image's partner")

    def mask_batch(rows: torch.Tensor, inputs: torch.Tensor, paired: torch.Tensor | None) -> torch.Tensor:
        return saliency_mask(model, inputs, strategy, partners=paired, **settings)[1]

    partners = partners if decisive else None
    return masks_by_batch(
        model, images, mask_batch, batch_size=batch_size, partners=partners, desc=desc, packed=packed
    )


def _shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each of the N images (N, ..., H, W) moved by (dy, dx) pixels, wrapping around the edges."""
    n, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    rows = (torch.arange(height, device=x.device) - dy.view(-1, 1)) % height  # (N, H)
    cols = (torch.arange(width, device=x.device) - dx.view(-1, 1)) % width  # (N, W)
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    moved = x.movedim((-2, -1), (1, 2))[batch, rows[:, :, None], cols[:, None, :]]
    return moved.movedim((1, 2), (-2, -1))


def random_masks_like(
    masks: torch.Tensor | PackedMasks, generator: torch.Generator
) -> torch.Tensor | PackedMasks:
    """Per image, the same mask moved to a random place: a random circular shift (rows and columns).

    Same number of pixels and the same blob shape as the saliency mask, so the control differs from MaskTune
    only in *where* it masks (scattered random pixels would be a different, noise-like corruption).
    """
    n, height, width = masks.shape
    dy = torch.randint(0, height, (n,), generator=generator).to(masks.device)
    dx = torch.randint(0, width, (n,), generator=generator).to(masks.device)
    if isinstance(masks, torch.Tensor):
        return _shift(masks, dy, dx)
    moved = torch.empty_like(masks.bits)
    for i in range(0, n, CHUNK_ROWS):  # unpacked a chunk at a time
        rows = slice(i, i + CHUNK_ROWS)
        moved[rows] = PackedMasks.pack(_shift(masks[rows], dy[rows], dx[rows])).bits
    return PackedMasks(moved, width)


def _centroids(masks: torch.Tensor) -> torch.Tensor:
    """(N, 2) mean row and column of each mask's pixels (0 for an empty mask)."""
    coords = torch.stack(
        torch.meshgrid(
            torch.arange(masks.shape[1], device=masks.device),
            torch.arange(masks.shape[2], device=masks.device),
            indexing="ij",
        )
    )
    weights = masks.float()
    return (weights[:, None] * coords).sum((2, 3)) / weights.sum((1, 2)).clamp_min(1)[:, None]


FILLS = ("shuffle_union", "shuffle", "swap", "black")


@dataclass
class MaskedImages:
    """uint8 images whose masked pixels are replaced batch by batch, as they are drawn (no filled copy of
    the training set is kept): ``masked[index]`` gives the images at ``index`` with their masks filled, and
    ``masked[:]`` all of them. ``partners[i]``: the image whose pixels fill image i's mask (see
    ``fill_masks``)."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    masks: PackedMasks  # on the images' device
    fill: str
    partners: torch.Tensor | None = None  # (N,) int64 on the images' device; None for "black"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __getitem__(self, index) -> torch.Tensor:
        images, masks = self.images[index], self.masks[index]
        if self.fill == "black":
            return torch.where(
                masks[:, None], torch.zeros((), dtype=images.dtype, device=images.device), images
            )
        partner = self.partners[index]
        source = self.images[partner]
        if self.fill == "shuffle_union":
            masks = masks | self.masks[partner]
        elif self.fill == "swap":
            offset = (_centroids(masks) - _centroids(self.masks[partner])).round().long()
            source = _shift(source, offset[:, 0], offset[:, 1])
        return torch.where(masks[:, None], source, images)


def masked_images(
    images: torch.Tensor,
    masks: torch.Tensor | PackedMasks,
    fill: str,
    generator: torch.Generator | None = None,
) -> MaskedImages:
    """``images`` with ``masks`` filled as ``fill`` says, each from a random other image drawn with
    ``generator`` (one ``randperm``: the same generator state gives every variant the same pairing).

    shuffle_union  the pixels of a random other image, over this image's mask and over that image's: what
                   the model relied on in either image is shown at random with respect to the label, even
                   where a feature's absence was not salient (a marker carried by one class only is
                   salient on that class's images alone; filling only this image's mask would bring the
                   marker to that class's images and leave the other class without it)
    shuffle        the pixels of a random other image, over this image's mask
    swap           the masked region of a random other image, moved onto this one's (their mask centroids
                   aligned): a marker that moves from image to image lands where this image's marker was
    black          zeros (the paper)
    """
    check_choice("mask_fill", fill, FILLS)
    masks = (PackedMasks.pack(masks) if isinstance(masks, torch.Tensor) else masks).to(images.device)
    if fill == "black":
        return MaskedImages(images, masks, fill)
    return MaskedImages(
        images, masks, fill, torch.randperm(len(images), generator=generator).to(images.device)
    )


def fill_masks(
    images: torch.Tensor, masks: torch.Tensor, fill: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 images with their masked pixels replaced (see ``masked_images``): a new tensor."""
    return masked_images(images, masks, fill, generator)[:]
