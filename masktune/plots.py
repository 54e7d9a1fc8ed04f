"""Figures saved as PNG files (matplotlib, no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from masktune.distributed import is_main  # noqa: E402


def _save(fig, path: str) -> str:
    if not is_main():  # under torchrun, rank 0 draws
        plt.close(fig)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _overlay(images: torch.Tensor, heatmaps: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 3, H, W) with each heatmap, scaled to its own range, drawn over them in the jet colour
    map at half opacity: floats in [0, 1]."""
    maps = heatmaps.detach().float().cpu()[:, None]
    maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    maps = (maps - low) / (high - low).clamp_min(1e-12)
    colours = torch.from_numpy(matplotlib.colormaps["jet"](maps.numpy())[..., :3]).permute(0, 3, 1, 2)
    return 0.5 * images.cpu().float() / 255 + 0.5 * colours.float()


def save_image_grid(path: str, rows: dict, titles: dict | None = None) -> str:
    """One row of images per entry ``name: (uint8 images, heatmaps or None)``, a heatmap drawn over its image
    where given; ``titles[name]`` names the columns of that row. The grid is one picture (one axes): quick to
    draw however many images it holds."""
    height, width = next(iter(rows.values()))[0].shape[-2:]
    band, gap = height // 4, max(width // 16, 1)  # room for the column titles above each row; between columns
    columns = max(len(images) for images, _ in rows.values())
    canvas = torch.ones(len(rows) * (band + height), columns * (width + gap), 3)
    fig, ax = plt.subplots(figsize=(1.6 * columns, 1.6 * len(rows) * (band + height) / height))
    for r, (name, (images, heatmaps)) in enumerate(rows.items()):
        tiles = _overlay(images, heatmaps) if heatmaps is not None else images.cpu().float() / 255
        top = r * (band + height) + band
        for i, tile in enumerate(tiles):
            left = i * (width + gap)
            canvas[top : top + height, left : left + width] = tile.permute(1, 2, 0)
            if titles and name in titles:
                ax.text(left + width / 2, top - 1, titles[name][i], ha="center", va="bottom", fontsize=7)
        ax.text(-gap, top + height / 2, name, ha="right", va="center", fontsize=8)
    ax.imshow(canvas.numpy(), interpolation="nearest")
    ax.axis("off")
    return _save(fig, path)


def save_training_curves(path: str, history: list[dict]) -> str:
    """Loss and accuracies per epoch of the ERM stage."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss")
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        if all(key in h for h in history):
            right.plot(epochs, [100 * h[key] for h in history], marker="o", label=key.replace("_", " "))
    right.set(xlabel="epoch", ylabel="accuracy (%)")
    right.legend()
    return _save(fig, path)


def save_grouped_bars(path: str, categories: list[str], values: dict, ylabel: str = "accuracy (%)") -> str:
    """One bar group per category, one bar per series (e.g. per-class accuracy of each model)."""
    width = 0.8 / max(len(values), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(categories)), 3.8))
    for i, (name, series) in enumerate(values.items()):
        ax.bar(
            [c + (i - (len(values) - 1) / 2) * width for c in range(len(categories))],
            series,
            width,
            label=name,
        )
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    return _save(fig, path)


def save_risk_coverage(path: str, curves: dict) -> str:
    """Risk (error on accepted samples) against coverage, one line per scorer."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (coverage, risk) in curves.items():
        ax.plot(100 * coverage, 100 * risk, label=name, linestyle="--" if name == "oracle" else "-")
    ax.set(xlabel="coverage (%)", ylabel="risk: error on accepted (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
