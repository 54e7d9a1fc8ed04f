"""The batched tensor operations that feed the models: an epoch's random draws made up front, flips and
crops of a whole batch, and evaluation batches in order."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    """One training batch's image indices and augmentation draws, on the images' device."""

    index: torch.Tensor
    flips: torch.Tensor | None = None  # (B,) bool: flip horizontally
    shifts: torch.Tensor | None = None  # (2, B): crop offsets (rows, columns) into the padded image


def draw_epoch(
    n: int, batch_size: int, generator: torch.Generator, augment: bool, device: torch.device, padding: int = 4
) -> list[Batch]:
    """Every random draw of a training epoch, made up front on the CPU: the ``randperm`` batch order, then
    each batch's flips and crop offsets. Moved to ``device`` in one copy each, so the training loop itself
    sends nothing between host and device."""
    order = torch.randperm(n, generator=generator)
    sizes = [len(part) for part in order.split(batch_size)]
    if len(sizes) > 1 and sizes[-1] == 1:  # a batch of one image breaks BatchNorm: it joins the one before
        sizes[-2:] = [sizes[-2] + 1]
    index = list(order.to(device).split(sizes))
    if not augment:
        return [Batch(i) for i in index]
    draws = [
        (
            torch.rand(len(i), generator=generator) < 0.5,
            torch.randint(0, 2 * padding + 1, (2, len(i)), generator=generator),
        )
        for i in order.split(sizes)
    ]
    flips = torch.cat([f for f, _ in draws]).to(device).split(sizes)
    shifts = torch.cat([s for _, s in draws], 1).to(device).split(sizes, 1)
    return [Batch(*b) for b in zip(index, flips, shifts)]


def flip_crop(
    images: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Horizontal flips where ``flips``, then crops at ``shifts`` after reflect padding, for a whole batch."""
    n, _, height, width = images.shape
    images = torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect").to(images.dtype)
    rows = shifts[0].view(-1, 1) + torch.arange(height, device=images.device)  # (B, H)
    cols = shifts[1].view(-1, 1) + torch.arange(width, device=images.device)  # (B, W)
    batch = torch.arange(n, device=images.device).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def in_order(n: int, batch_size: int) -> list[torch.Tensor]:
    """Index batches in order, for evaluation. For ``n == 0``, one empty batch: a process with an empty share
    under torchrun still produces a (0, ...) output to gather."""
    return list(torch.arange(n).split(batch_size)) or [torch.arange(0)]
