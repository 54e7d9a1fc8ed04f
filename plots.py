"""Figures saved as PNG files (matplotlib, no display needed)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distributed import is_main  # noqa: E402


def _save(fig, path: str) -> str:
    if not is_main():  # under torchrun, rank 0 draws
        plt.close(fig)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rgb(image: torch.Tensor):
    return image.permute(1, 2, 0).cpu().numpy()


def save_image_grid(path: str, rows: dict, titles: dict | None = None) -> str:
    """One row of images per entry ``name: (uint8 images, heatmaps or None)``, a heatmap drawn over its image
    where given; ``titles[name]`` names the columns of that row."""
    width = max(len(images) for images, _ in rows.values())
    fig, axes = plt.subplots(len(rows), width, figsize=(1.6 * width, 1.6 * len(rows)), squeeze=False)
    for r, (name, (images, heatmaps)) in enumerate(rows.items()):
        for i in range(len(images)):
            axes[r, i].imshow(_rgb(images[i]))
            if heatmaps is not None:
                axes[r, i].imshow(heatmaps[i].detach().float().cpu().numpy(), cmap="jet", alpha=0.5)
            if titles and name in titles:
                axes[r, i].set_title(titles[name][i], fontsize=7)
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    for ax in axes.flat:
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
