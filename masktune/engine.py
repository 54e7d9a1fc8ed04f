"""The loops every script shares: ``train_epoch``, ``predict``, and ``train``, which runs epochs with
checkpoints, resumption and best-epoch selection (for ERM and for every fine-tune).

What an epoch trains on is a ``TrainingSet``: the images and labels, the loss the script hands in (the one
place to change the training objective), the batch size, augmentation and precision. The accuracies it
reports come from ``correct_predictions``, which does not depend on the loss.
"""

import hashlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from masktune.batches import Batch, draw_epoch, flip_crop, in_order
from masktune.checkpoint import load_weights, resumable, save_checkpoint
from masktune.console import check, progress
from masktune.device import autocast, model_device
from masktune.distributed import batch_slice, gather_rows, my_range, sum_all, wrap

LOG_EVERY = 25  # steps between progress-bar updates: the only times the loop waits for the device


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many predictions are right, on the device: argmax for class labels; for 0/1 attribute labels
    (N, A), the correct attributes / A of each image."""
    if labels.is_floating_point():
        return ((logits > 0) == (labels > 0.5)).float().mean(1).sum()
    return (logits.argmax(1) == labels).sum()


@dataclass
class TrainingSet:
    """What a training stage sees: uint8 ``images`` (a tensor, or anything that gives a batch of them for an
    index tensor, such as ``masking.MaskedImages``), their ``labels``, and how to train on them."""

    images: torch.Tensor
    labels: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (float logits, labels) -> a scalar
    batch_size: int
    augment: bool = True  # batched flips and crops
    amp: bool = False  # bf16 autocast where bf16 is native
    streamed: bool = False  # images kept in host memory: batches gathered there a step ahead (batch_feed)

    def __len__(self) -> int:
        return len(self.labels)


def batch_feed(data: TrainingSet, batches: list[Batch], device: torch.device) -> Iterator[tuple]:
    """Each batch's images (augmented) and labels on ``device``: this process's rows of the global batch.
    Data on the device is gathered there; streamed data is gathered on the host by a thread one batch
    ahead of the step (pinned for CUDA) and copied without blocking, so the copy overlaps the training."""

    def gather(batch: Batch) -> tuple[torch.Tensor, Batch]:
        x = data.images[batch_slice(batch.index)]
        return (x.pin_memory() if data.streamed and device.type == "cuda" else x), batch

    def finish(x: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(device, non_blocking=True)
        if data.augment:  # per image, so augmenting this process's rows equals slicing the augmented batch
            flips = batch_slice(batch.flips).to(device, non_blocking=True)
            shifts = batch_slice(batch.shifts.T).T.to(device, non_blocking=True)
            x = flip_crop(x, flips, shifts)
        y = data.labels[batch_slice(batch.index).to(data.labels.device)]
        return x, y.to(device, non_blocking=True)

    if not data.streamed:
        for batch in batches:
            yield finish(*gather(batch))
        return
    # One intra-op thread for the gather: a thread of its own would start an OpenMP team that spins on the
    # cores the training step uses (on 2 CPU cores that cost the step 15%).
    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        pending = pool.submit(gather, batches[0])
        for i in range(len(batches)):
            x, batch = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(gather, batches[i + 1])
            yield finish(x, batch)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingSet,
    generator: torch.Generator,
    lr_at: Callable[[float], float] | None = None,
    desc: str = "train",
) -> dict:
    """One epoch over ``data`` in ``randperm`` order from ``generator``, with batched flips and crops;
    ``lr_at(fraction of the epoch done)`` sets the learning rate before each step.

    Under torchrun every process draws the same global batch and trains on its slice of it (DDP). A
    non-finite loss stops the run with a UserError.
    """
    model.train()
    net = wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    device, start = model_device(model), time.time()
    batches = draw_epoch(len(data), data.batch_size, generator, data.augment, data.images.device)
    order_sha1 = hashlib.sha1(torch.cat([b.index for b in batches]).cpu().numpy().tobytes()).hexdigest()
    totals, seen = torch.zeros(2, dtype=torch.float64, device=device), 0  # loss sum and correct, on device
    bar = progress(batch_feed(data, batches, device), desc=desc, total=len(batches))
    for step, (x, y) in enumerate(bar):  # this process's share of the global batch, on the device
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step / len(batches))
        with autocast(device, data.amp):
            logits = net(x)[0].float()
        loss = data.loss(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.stack(
            [loss.detach().double() * len(y), correct_predictions(logits.detach(), y).double()]
        )
        seen += len(y)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == len(batches):  # a host sync, so not at every step
            loss_sum, correct_sum = totals.tolist()
            check(
                math.isfinite(loss_sum),
                f"{desc}: the loss became {loss_sum / seen} by step {step + 1}; lower "
                "the learning rate (checkpoints already written are untouched)",
            )
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct_sum / seen:.3f}")
    loss_sum, correct_sum, seen = sum_all([*totals.tolist(), seen])
    return {
        "loss": loss_sum / seen,
        "train_accuracy": correct_sum / seen,
        "seconds": time.time() - start,
        "batch_order_sha1": order_sha1,
    }


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int, amp: bool = False, desc: str = "predict"
) -> torch.Tensor:
    """Logits for every image, in order, as a float CPU tensor (N, C). Under torchrun each process
    predicts a contiguous share and every process gets the whole result."""
    model.eval()
    device, mine = model_device(model), my_range(len(images))
    outputs = []
    for index in progress(in_order(len(mine), batch_size), desc=desc):
        with autocast(device, amp):
            outputs.append(model(images[(index + mine.start).to(images.device)].to(device))[0].float().cpu())
    return gather_rows(torch.cat(outputs), len(images))


def predict_all(models: dict, images: torch.Tensor, *, batch_size: int, amp: bool = False) -> dict:
    """Every model's logits (``predict``), by name."""
    return {name: predict(m, images, batch_size=batch_size, amp=amp, desc=name) for name, m in models.items()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return correct_predictions(logits, labels.to(logits.device)).item() / max(len(labels), 1)


def weights_sha1(model: nn.Module) -> str:
    """Fingerprint of a model's weights (to show that runs started from the same ones)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def format_stats(stage: str, stats: dict) -> str:
    """One summary line: loss, every accuracy, seconds."""
    parts = [
        f"{k.replace('_accuracy', ' acc')} {100 * v:.2f}%"
        for k, v in stats.items()
        if k.endswith("accuracy") and isinstance(v, float)
    ]
    return f"{stage}: loss {stats['loss']:.4f}, " + ", ".join(parts) + f", {stats['seconds']:.0f}s"


@dataclass
class Stage:
    """One training stage of a run (ERM, or one fine-tune): its name, the checkpoint it writes after every
    epoch (and, with ``best_path``, the best validation epoch's), the run's config that the checkpoints
    record, whether to resume, and ``extra`` facts to store beside the metrics."""

    name: str
    path: str
    config: dict
    resume: bool = False
    best_path: str = ""
    extra: dict = field(default_factory=dict)


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: TrainingSet,
    stage: Stage,
    *,
    epochs: int,
    lr_at: Callable[[float], float],
    generator: torch.Generator,
    evaluate: Callable[[nn.Module], dict],
) -> list[dict]:
    """Train for ``epochs`` (``lr_at(epochs done)`` gives the learning rate), evaluating after each one;
    return the per-epoch history.

    After every epoch the full state (weights, optimizer, data-order generator, history, ``stage.extra``)
    goes to ``stage.path``, atomically: Ctrl-C or a crash keeps the last finished epoch, and
    ``stage.resume`` continues from it (bit for bit on a CPU; on CUDA up to cuDNN's non-deterministic
    kernels); a finished stage is not trained again. With ``stage.best_path``, the epoch with the best
    validation accuracy also goes there; on ties the later epoch wins (on biased data validation accuracy
    saturates early, and the earliest epoch at the ceiling is a poor model to start from).
    """
    history, best, first = [], -1.0, 0
    state = resumable(stage.path, stage.config) if stage.resume else None
    if state is not None:
        load_weights(model, state, stage.path)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator_state"])
        history, best, first = state["metrics"]["history"], state["best"], state["epoch"]
        action = "done before, kept" if first >= epochs else f"resuming after epoch {first} from"
        print(f"{stage.name}: {action} {stage.path}")
    for epoch in range(first, epochs):
        name = f"{stage.name} epoch {epoch + 1}/{epochs}"
        stats = train_epoch(
            model, optimizer, data, generator, lambda done, epoch=epoch: lr_at(epoch + done), desc=name
        )
        stats.update(evaluate(model))
        history.append({"epoch": epoch + 1, **stats})
        print(format_stats(name, stats))
        score = stats.get("val_accuracy", stats.get("test_accuracy"))
        if stage.best_path and score >= best:
            best = score
            save_checkpoint(
                stage.best_path,
                model,
                optimizer,
                stage.config,
                epoch + 1,
                {**stats, "history": history},
                stage=stage.name,
            )
        save_checkpoint(
            stage.path,
            model,
            optimizer,
            stage.config,
            epoch + 1,
            {**stage.extra, **stats, "history": history},
            stage=stage.name,
            best=best,
            generator_state=generator.get_state(),
        )
    return history


FINETUNE_SCHEDULES = ("constant", "linear", "one_cycle")


def finetune_lr(learning_rate: float, epochs: int, schedule: str) -> Callable[[float], float]:
    """The fine-tuning learning rate after ``done`` epochs: constant; decayed linearly to 0 ("linear"); or
    warmed up linearly over the first quarter, then decayed linearly to 0 ("one_cycle": a model at the end
    of its ERM schedule can diverge when the rate jumps up at once)."""
    if schedule == "constant":
        return lambda done: learning_rate
    warmup = epochs / 4 if schedule == "one_cycle" else 0.0
    return lambda done: (
        learning_rate * min((done + 1e-3) / warmup if warmup else 1.0, (epochs - done) / (epochs - warmup))
    )


def finetune_length(images: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Epochs of fine-tuning: ``epochs``, or more whole epochs until at least ``min_steps`` steps (on a small
    data set one epoch is only a few dozen steps)."""
    return max(epochs, math.ceil(min_steps / math.ceil(images / batch_size)))
