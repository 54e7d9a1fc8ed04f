"""The MaskTune stages that vgg.py and resnet50.py share, written once: the settings' checks, the
validation and test accuracy after every epoch, the masks of the training set and the two controls, and
the fine-tunes from the ERM model's weights and optimizer state.

A ``Run`` holds what every stage needs (the config, the device, the data, the training loss); the scripts
keep their hyperparameters and read top to bottom as the experiment, calling it at each stage.
"""

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn as nn

from masktune.checkpoint import (
    atomic_save,
    ensure_writable_dir,
    load_checkpoint,
    load_optimizer,
    load_weights,
)
from masktune.console import check, check_choice
from masktune.device import PeakMemory, fits_on_device, pick_device, seed_everything
from masktune.distributed import barrier, init_distributed, is_main
from masktune.engine import (
    FINETUNE_SCHEDULES,
    Stage,
    TrainingSet,
    accuracy,
    finetune_length,
    finetune_lr,
    predict,
    train,
    weights_sha1,
)
from masktune.images import ImageSet
from masktune.masking import (
    FILLS,
    MaskedImages,
    PackedMasks,
    add_consensus,
    class_mask_rates,
    compute_masks,
    mask_settings,
    masked_images,
    other_class_partners,
    random_masks_like,
    saliency_map,
)
from masktune.plots import save_image_grid
from masktune.seeds import stream
from masktune.shortcuts import evaluation_sets, planted_pixels


def check_training_settings(config: dict, strategies: tuple[str, ...]) -> dict:
    """The settings both scripts share, checked (one line per mistake); returns the masking settings for
    ``compute_masks`` (``strategies``: the saliency maps the script offers)."""
    check(config["batch_size"] > 0 and config["eval_batch_size"] > 0, "batch sizes must be positive")
    check(
        config["num_epochs"] > 0 and config["finetune_epochs"] >= 0,
        "num_epochs must be positive, finetune_epochs >= 0",
    )
    check(
        config["learning_rate"] > 0 and config["finetune_learning_rate"] > 0,
        "learning rates must be positive",
    )
    check(
        0 <= config["momentum"] < 1 and config["weight_decay"] >= 0,
        "momentum must be in [0, 1), weight_decay >= 0",
    )
    check_choice("masking", config["masking"], strategies)
    check(config["masking"] != "planted" or config["shortcut"], "masking='planted' needs a planted shortcut")
    check(0 <= config["mask_class_share"] < 1, "mask_class_share must be in [0, 1)")
    check(0 <= config["mask_consensus"] <= 1, "mask_consensus must be in [0, 1] (0: off)")
    check(config["mask_rounds"] >= 1, "mask_rounds must be at least 1")
    check(0 <= config["mask_round_reach"] <= 1, "mask_round_reach must be in [0, 1]")
    check_choice("mask_fill", config["mask_fill"], FILLS)
    check_choice("finetune_from", config["finetune_from"], ("best", "last"))
    check_choice("finetune_schedule", config["finetune_schedule"], FINETUNE_SCHEDULES)
    return mask_settings(config)


def start_run(config: dict) -> tuple[torch.device, torch.Generator, PeakMemory]:
    """What a training script does once its settings are checked: make its folders (``checkpoint_dir``,
    ``out_dir``), pick its ``device`` (under torchrun: this process's), seed every random number generator
    (the generator it returns draws the data order and augmentation), and start measuring its peak memory
    per stage, for its summary."""
    ensure_writable_dir(config["checkpoint_dir"])
    ensure_writable_dir(config["out_dir"])
    device = init_distributed(pick_device(config["device"]))
    return device, seed_everything(config["seed"]), PeakMemory(device)


@dataclass
class Run:
    """One MaskTune run: its ``config`` (the script's hyperparameters), device, data, the training loss
    the script hands in, and ``prefix``: its checkpoints are ``checkpoint_dir/{prefix}_{name}.pt``."""

    config: dict
    device: torch.device
    train_set: ImageSet
    val_set: ImageSet
    test_set: ImageSet
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    prefix: str

    def __post_init__(self):
        c = self.config
        # the training images go to the device once when they fit, else batches stream from host memory
        # (a memory-mapped cache_dir file stays shared); every stage trains on them or on masked views
        images = self.train_set.images
        self.streamed = not fits_on_device(images.nbytes, self.device, c["device_data_gb"])
        self.train_images = images if self.streamed else images.to(self.device)
        self.train_labels = self.train_set.labels.to(self.device)
        # whole epochs until at least finetune_min_steps steps (one epoch of a small set is a few steps)
        self.finetune_epochs = c["finetune_epochs"] and finetune_length(
            len(self.train_set), c["batch_size"], c["finetune_epochs"], c["finetune_min_steps"]
        )
        self.erm_epochs = c["num_epochs"]
        self.class_mask_rates = []  # per class, the share of its images the last masks_of call masked
        self.fine_tuned = {}  # (start weights, masks) -> the finished fine-tune Stage that trained on them
        if c.get("dry_run"):  # one epoch of each stage: checks the set-up in seconds
            self.erm_epochs, self.finetune_epochs = 1, min(self.finetune_epochs, 1)

    @cached_property
    def mask_partners(self) -> torch.Tensor:
        """For each training image, the image of another class that decisive masks are tested against."""
        return other_class_partners(self.train_labels, stream(self.config["seed"], "mask_partners"))

    def path(self, name: str) -> str:
        return os.path.join(self.config["checkpoint_dir"], f"{self.prefix}_{name}.pt")

    def training_set(self, images: torch.Tensor | MaskedImages | None = None) -> TrainingSet:
        """The training images (or a masked view of them) with their labels, loss and batch settings."""
        c = self.config
        images = self.train_images if images is None else images
        return TrainingSet(
            images, self.train_labels, self.loss, c["batch_size"], c["augment"], c["amp"], self.streamed
        )

    def evaluate(self, model: nn.Module) -> dict:
        """Accuracy on the validation and test sets (CelebA: mean attribute accuracy)."""
        batch_size, amp = self.config["eval_batch_size"], self.config["amp"]
        return {
            f"{name}_accuracy": accuracy(
                predict(model, s.images, batch_size=batch_size, amp=amp, desc=name), s.labels
            )
            for name, s in (("val", self.val_set), ("test", self.test_set))
        }

    def train(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        stage: Stage,
        *,
        epochs: int,
        lr_at: Callable[[float], float],
        generator: torch.Generator,
        images: torch.Tensor | MaskedImages | None = None,
    ) -> list[dict]:
        """``engine.train`` on the training images (or ``images``, a masked view of them)."""
        data = self.training_set(images)
        return train(
            model,
            optimizer,
            data,
            stage,
            epochs=epochs,
            lr_at=lr_at,
            generator=generator,
            evaluate=self.evaluate,
        )

    def stage(self, name: str, file: str, **settings) -> Stage:
        """The ``Stage`` named ``name`` that writes ``{prefix}_{file}.pt``."""
        return Stage(name, self.path(file), self.config, self.config["resume"], **settings)

    def masks(self, model: nn.Module, optimizer: torch.optim.Optimizer, start: dict) -> PackedMasks:
        """The training set's masks from the frozen ``model`` (the best ERM epoch), with the run's masking
        settings, packed, on the training images' device. With ``mask_rounds`` > 1, each further round
        fine-tunes ``model`` from ``start`` (weights and ``optimizer`` state) on the images masked so far,
        as MaskTune does, and adds the masks of that model: what the fine-tune learned in place of the
        masked pixels (a large marker's unmasked rim). ``model`` ends with its own weights again."""
        masks = self.masks_of(model, "masking")
        if self.config["mask_rounds"] == 1:
            return masks
        own = {k: v.clone() for k, v in model.state_dict().items()}
        reach = round(self.config["mask_round_reach"] * masks.shape[-1])
        for done in range(1, self.config["mask_rounds"]):
            load_weights(model, start)
            load_optimizer(optimizer, start)
            self.fine_tune(model, optimizer, f"round{done}", self.masked(masks))
            more = self.masks_of(model, f"masking, round {done + 1}")
            masks = masks | (more.near(masks, reach) if reach > 0 else more)
        model.load_state_dict(own)
        return masks

    def masks_of(self, model: nn.Module, desc: str) -> PackedMasks:
        """The training set's masks from the frozen ``model``, with the run's masking settings; none where
        the decisive masks cover less than ``mask_class_share`` of every class's images (see masking.py).
        The share is judged before each class's consensus is added: tested on every image of a class, a
        consensus as large as a centred object decides as an object does, on many more of its images."""
        c = self.config
        if c["masking"] == "planted":  # what perfect masks would do: the upper bound of any saliency map
            masks = PackedMasks.pack(planted_pixels(self.train_set).to(self.train_images.device))
        else:
            masks = compute_masks(
                model,
                self.train_images,
                c["masking"],
                batch_size=c["eval_batch_size"],
                partners=self.mask_partners,
                multilabel=self.train_labels.is_floating_point(),
                amp=c["amp"],
                packed=True,
                desc=desc,
                **mask_settings(c),
            )
        self.class_mask_rates = class_mask_rates(masks, self.train_labels).tolist()
        if self.masks_dropped():
            return PackedMasks.empty(*masks.shape, masks.device)  # no shortcut: the no-mask fine-tune
        if c["masking"] != "planted" and c["mask_consensus"] > 0 and c["mask_extent"] == "decisive":
            masks = add_consensus(
                model,
                self.train_images,
                masks,
                self.train_labels,
                self.mask_partners,
                c["mask_consensus"],
                batch_size=c["eval_batch_size"],
                multilabel=self.train_labels.is_floating_point(),
                amp=c["amp"],
                desc=f"{desc}, class consensus",
            )
        return masks

    def masks_dropped(self) -> bool:
        """Whether the last masks_of call dropped its decisive masks (no class reached the share)."""
        c = self.config
        return c["mask_extent"] == "decisive" and max(self.class_mask_rates) < c["mask_class_share"]

    def describe_class_mask_rates(self) -> str:
        """The line the scripts print about the last masks' share of each class's images."""
        rates = self.class_mask_rates
        most = rates.index(max(rates))  # multi-label: the index of a distinct set of labels
        name = f"set {most}" if self.train_labels.is_floating_point() else self.train_set.classes[most]
        planted = self.config["masking"] == "planted"
        what = "the planted marker is" if planted else "a region decides the prediction"
        share = f"{100 * min(rates):.1f}-{100 * max(rates):.1f}%"
        line = f"{what} on {share} of a class's training images (most: {name})"
        if self.masks_dropped():
            share = self.config["mask_class_share"]
            line += f", under mask_class_share={share}: no masks (the no-mask fine-tune)"
        return line

    def fine_tune_sets(self, masks: PackedMasks) -> dict[str, MaskedImages]:
        """What each fine-tune trains on: MaskTune's masks and, with ``controls``, no masks and the same
        masks moved to random places; every variant with the same pairing of images for the fill, so
        they differ only in their masks."""
        c = self.config
        masks_of = {"finetuned": masks}
        if c["controls"]:
            masks_of["nomask"] = PackedMasks.empty(*masks.shape, masks.device)
            masks_of["randommask"] = random_masks_like(masks, stream(c["seed"], "random_masks"))
        return {name: self.masked(m) for name, m in masks_of.items()}

    def masked(self, masks: PackedMasks) -> MaskedImages:
        """The training images with ``masks`` filled; every variant and round draws the same pairing."""
        c = self.config
        return masked_images(self.train_images, masks, c["mask_fill"], stream(c["seed"], "fill_pairing"))

    def fine_tune(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        name: str,
        images: torch.Tensor | MaskedImages,
        extra: dict | None = None,
    ) -> list[dict]:
        """Fine-tune ``model`` (already holding its start weights) for the run's fine-tuning epochs on
        ``images``, writing ``{prefix}_{name}.pt``; ``extra`` goes into its checkpoint beside the metrics."""
        c = self.config
        masks = images.masks if isinstance(images, MaskedImages) else None
        facts = {
            "start_weights_sha1": weights_sha1(model),
            "finetune_epochs_run": self.finetune_epochs,
            **({} if masks is None else {"masked_fraction": masks.fraction()}),
            **(extra or {}),
        }
        stage = self.stage(f"fine-tune {name}", name, extra=facts)
        # the same start, masks, pairing and batches train the same model: where the masks were dropped
        # the controls are MaskTune's fine-tune, so its checkpoint is copied instead of trained again
        same = (facts["start_weights_sha1"], "images" if masks is None else masks_sha1(masks))
        twin = self.fine_tuned.get(same)
        if twin is not None:
            return self.copy_fine_tune(model, optimizer, twin, stage)
        history = self.train(
            model,
            optimizer,
            stage,
            epochs=self.finetune_epochs,
            lr_at=finetune_lr(c["finetune_learning_rate"], self.finetune_epochs, c["finetune_schedule"]),
            generator=stream(c["seed"], "finetune_order"),  # the same batches for every variant
            images=images,
        )
        self.fine_tuned[same] = stage
        return history

    def copy_fine_tune(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, twin: Stage, stage: Stage
    ) -> list[dict]:
        """``twin``'s finished fine-tune as ``stage``'s: its checkpoint under ``stage``'s name and facts, its
        weights and optimizer state in ``model`` and ``optimizer``; returns its history."""
        state = load_checkpoint(twin.path)
        load_weights(model, state, twin.path)
        optimizer.load_state_dict(state["optimizer"])
        state["metrics"] = {**state["metrics"], **stage.extra}
        if is_main():
            atomic_save({**state, "stage": stage.name, "config": dict(stage.config)}, stage.path)
        barrier()
        print(f"{stage.name}: the same training as {twin.name} (the same masks), its checkpoint copied")
        return state["metrics"]["history"]


def masks_sha1(masks: PackedMasks) -> str:
    """Fingerprint of a run's masks (to show which masks a fine-tune saw)."""
    return hashlib.sha1(masks.bits.cpu().numpy().tobytes()).hexdigest()


# the settings that decide a run's data: an ERM model trained with other values saw other images
DATA_SETTINGS = (
    "dataset",
    "seed",
    "val_fraction",
    "dry_run",
    "group_csv",
    "shortcut",
    "shortcut_ratio",
    "shortcut_size",
    "shortcut_position",
    "shortcut_classes",
)


def reuse_erm(run: Run, erm_dir: str, architecture: str) -> None:
    """Copy the finished ERM checkpoints of another run on the same data (``erm_dir``) beside this run's, so
    the fine-tunes and the evaluation scripts find them; one line if they are unfinished or of other data."""
    names = ("initial", "last")
    source = [os.path.join(erm_dir, os.path.basename(run.path(n))) for n in names]
    check(os.path.isfile(source[0]), f"erm_dir {erm_dir!r} has no {os.path.basename(source[0])}")
    last = load_checkpoint(source[1], architecture, len(run.train_set.classes))
    theirs = last["config"]
    epochs = 1 if theirs.get("dry_run") else theirs["num_epochs"]
    check(
        last["epoch"] == epochs,
        f"erm_dir {erm_dir!r} holds an unfinished ERM (epoch {last['epoch']} of {epochs}): "
        "finish it with its own command and --resume=True",
    )
    differing = [k for k in DATA_SETTINGS if theirs.get(k) != run.config.get(k)]
    check(
        not differing,
        f"erm_dir {erm_dir!r} holds an ERM trained on other data: "
        + ", ".join(f"{k}={theirs.get(k)!r}" for k in differing),
    )
    if is_main() and os.path.abspath(erm_dir) != os.path.abspath(run.config["checkpoint_dir"]):
        for path, name in zip(source, names):
            shutil.copyfile(path, run.path(name))


class WhyFigure:
    """why.png: on eight training images, the ERM model's heatmap, the mask and what the fine-tune sees;
    on eight test images (with a planted shortcut: images whose marker is another class's), where the ERM
    and the MaskTune models look. Built in two steps: with the ERM model, then with the fine-tuned one."""

    def __init__(self, run: Run, erm_model: nn.Module, masks: PackedMasks):
        c = run.config
        self.run, self.masks = run, masks
        self.settings = dict(smoothing=c["gradient_smoothing"], amp=c["amp"])
        self.examples = torch.randperm(len(run.train_images), generator=stream(c["seed"], "erm"))[:8]
        self.shown = (
            evaluation_sets(run.test_set, c, stream(c["seed"], "test_sets"))["conflicting"]
            if c.get("shortcut")
            else run.test_set
        )
        self.shown_index = torch.randperm(len(self.shown), generator=stream(c["seed"], "erm"))[:8]
        self.shown_images = self.shown.images[self.shown_index].to(run.device)
        # decisive integrated maps start from the partner each mask was tested against; the test images
        # have none, so theirs start from the zero input
        erm_baselines = None
        if c["mask_extent"] == "decisive":
            partners = run.mask_partners[self.examples]
            erm_baselines = run.train_images[partners.to(run.train_images.device)]
        self.erm_heatmaps = self.heatmaps(erm_model, run.train_images[self.examples], erm_baselines)
        self.erm_shown_heatmaps = self.heatmaps(erm_model, self.shown_images)

    def heatmaps(
        self, model: nn.Module, images: torch.Tensor, baselines: torch.Tensor | None = None
    ) -> torch.Tensor:
        device = self.run.device
        baselines = None if baselines is None else baselines.to(device)
        strategy = self.run.config["masking"]
        strategy = "gradient" if strategy == "planted" else strategy  # where the model looks, at least
        return saliency_map(model, images.to(device), strategy, baselines=baselines, **self.settings)

    def save(self, path: str, tuned_model: nn.Module, seen: MaskedImages) -> None:
        run, examples = self.run, self.examples
        mask_pictures = self.masks[examples][:, None].expand(-1, 3, -1, -1).to(torch.uint8) * 255
        save_image_grid(
            path,
            {
                "training image": (run.train_images[examples], None),
                "ERM heatmap": (run.train_images[examples], self.erm_heatmaps),
                "mask": (mask_pictures, None),
                "fine-tune sees": (seen[examples.to(seen.device)], None),
                "test image": (self.shown_images, None),
                "ERM on test": (self.shown_images, self.erm_shown_heatmaps),
                "MaskTune on test": (self.shown_images, self.heatmaps(tuned_model, self.shown_images)),
            },
            titles={
                "training image": [run.train_set.classes[int(c)] for c in run.train_labels[examples]],
                "test image": [self.shown.classes[int(c)] for c in self.shown.labels[self.shown_index]],
            },
        )
