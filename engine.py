"""The training and inference loops every script shares: ``train_epoch`` and ``predict``."""
import hashlib
import math
import os
import signal
import threading
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError, autocast, progress
from data import augment_flip_crop, batch_order, normalize
from distributed import batch_slice, gather_rows, is_main, my_range, sum_all, wrap


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Correct predictions: argmax for class labels; for 0/1 attribute labels, correct attributes / A."""
    if labels.is_floating_point():
        return ((logits > 0) == (labels > 0.5)).float().mean(1).sum().item()
    return (logits.argmax(1) == labels).sum().item()


class StopRequest:
    """While active, Ctrl-C (SIGINT) only sets ``requested``: the loop finishes its step, saves, then stops.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, kind, value, traceback) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and kind is None:  # arrived after the loop's last check: stop now
            raise KeyboardInterrupt


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool = False,
                  compile_model: bool = False) -> nn.Module:
    """Move ``model`` to ``device``; on CUDA and CPU, NHWC memory format (``channels_last``: measured 1.25x
    training and 1.5x evaluation on a CPU); on CUDA, cuDNN autotuning; ``compile_model``: torch.compile in
    place (the module keeps its class and state-dict names)."""
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last and device.type in ("cuda", "cpu"):
        model = model.to(memory_format=torch.channels_last)
    if compile_model:
        model.compile()
    return model


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                *, batch_size: int, device: torch.device, generator: torch.Generator, mean: tuple, std: tuple,
                augment: bool = True, loss_fn: Callable = F.cross_entropy,
                lr_schedule: Callable[[float], float] | None = None, epoch: int = 0, desc: str = "train",
                partial: dict | None = None, save_partial: Callable[[dict], None] | None = None,
                amp: bool = False) -> dict:
    """One epoch over uint8 ``images`` in ``randperm`` order (from ``generator``), batched augmentation.

    ``lr_schedule(progress)`` gives the learning rate at a fractional epoch count. A non-finite loss stops
    the run with a UserError (the caller's checkpoints stay as they were). On Ctrl-C the current step is
    finished, ``save_partial(state)`` stores where the epoch stopped and KeyboardInterrupt is raised; passing
    that state back as ``partial`` continues the epoch exactly (same batches, same augmentation draws).
    Under torchrun every process draws the same global batch and trains on its slice of it (DDP).
    ``amp``: bf16 autocast where bf16 is native (see ``config.autocast``).
    """
    model.train()
    net = wrap(model)
    start = time.time()
    if partial is not None:  # the batch order of the interrupted epoch is drawn again from its start state
        generator.set_state(partial["epoch_generator_state"])
    epoch_generator_state = generator.get_state()
    batches = batch_order(len(images), batch_size, generator)
    totals = {"loss": 0.0, "correct": 0.0, "seen": 0, "order_sha1": ""}
    first_step = 0
    if partial is not None:  # continue an interrupted epoch after its last finished step
        generator.set_state(partial["generator_state"])
        first_step = partial["step"]
        if is_main():  # the saved totals are over all processes: counted once
            totals = dict(partial["totals"])
        else:
            totals["order_sha1"] = partial["totals"]["order_sha1"]
    bar = progress(batches[first_step:], desc=desc, initial=first_step, total=len(batches))
    with StopRequest() as stop:
        for step, index in enumerate(bar, start=first_step):
            if lr_schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr_schedule(epoch + step / len(batches))
            x = images[index.to(images.device)]
            if augment:  # the whole global batch, so that every process makes the same random draws
                x = augment_flip_crop(x, generator)
            x = normalize(batch_slice(x).to(device, non_blocking=True), mean, std)
            y = batch_slice(labels[index.to(labels.device)]).to(device, non_blocking=True)
            with autocast(device, amp):
                logits, _ = net(x)
                loss = loss_fn(logits.float(), y)
            if not math.isfinite(loss.item()):
                raise UserError(f"{desc}: loss became {loss.item()} at step {step} of epoch {epoch + 1}; lower the "
                                "learning rate (checkpoints already written are untouched)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["loss"] += loss.item() * len(y)
            totals["correct"] += count_correct(logits.detach(), y)
            totals["seen"] += len(y)
            totals["order_sha1"] = hashlib.sha1(totals["order_sha1"].encode() + index.numpy().tobytes()).hexdigest()
            if step % 20 == 0:
                bar.set_postfix(loss=f"{totals['loss'] / totals['seen']:.3f}",
                                acc=f"{totals['correct'] / totals['seen']:.3f}")
            if sum_all([float(stop.requested)])[0] > 0:  # any process asked: all stop after the same step
                if save_partial is not None:
                    save_partial({"step": step + 1, "epoch_generator_state": epoch_generator_state,
                                  "generator_state": generator.get_state(), "totals": _summed(totals)})
                raise KeyboardInterrupt
    totals = _summed(totals)
    return {"loss": totals["loss"] / totals["seen"], "train_accuracy": totals["correct"] / totals["seen"],
            "seconds": time.time() - start, "batch_order_sha1": totals["order_sha1"]}


def _summed(totals: dict) -> dict:
    """Loss, correct and seen counts summed over the processes (the batch-order fingerprint is shared)."""
    loss, correct, seen = sum_all([totals["loss"], totals["correct"], totals["seen"]])
    return {"loss": loss, "correct": correct, "seen": int(seen), "order_sha1": totals["order_sha1"]}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, mean: tuple,
            std: tuple, desc: str = "predict", amp: bool = False) -> torch.Tensor:
    """Logits for every image, in order, as a float CPU tensor (N, C). Under torchrun each process
    predicts a contiguous share and every process gets the whole result."""
    model.eval()
    mine = my_range(len(images))
    outputs = []
    for index in progress(batch_order(len(mine), batch_size, None), desc=desc):
        x = normalize(images[(index + mine.start).to(images.device)].to(device, non_blocking=True), mean, std)
        with autocast(device, amp):
            outputs.append(model(x)[0].float().cpu())
    return gather_rows(torch.cat(outputs), len(images))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return count_correct(logits, labels.to(logits.device)) / max(len(labels), 1)


def weights_sha1(model: nn.Module) -> str:
    """Fingerprint of a model's weights (to show that runs started from the same ones)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def format_stats(stage: str, stats: dict) -> str:
    """One summary line: loss, every accuracy, seconds."""
    parts = [f"{k.replace('_accuracy', ' acc')} {100 * v:.2f}%" for k, v in stats.items()
             if k.endswith("accuracy") and isinstance(v, float)]
    return f"{stage}: loss {stats['loss']:.4f}, " + ", ".join(parts) + f", {stats['seconds']:.0f}s"


def finetune(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
             epochs: int, learning_rate: float, data_seed: int, evaluate: Callable[[nn.Module], dict],
             desc: str, config: dict, partial_path: str, resume: bool = False, **train_kwargs) -> dict:
    """Fine-tune ``model`` (already holding its starting weights and optimizer state) at a constant learning
    rate. The batch order and augmentation come from ``data_seed`` alone, so MaskTune and its controls see
    the same batches; the returned stats fingerprint both the starting weights and the batch order.

    Ctrl-C saves the interrupted fine-tune to ``partial_path``, from which ``resume`` continues it exactly;
    the file is removed once the fine-tune is complete.
    """
    from checkpoint import load_weights, resumable, save_checkpoint
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    start_sha1 = weights_sha1(model)
    data_order = torch.Generator().manual_seed(data_seed)
    first_epoch, partial = 0, None
    saved = resumable(partial_path, config) if resume else None
    if saved is not None:
        load_weights(model, saved, partial_path)
        optimizer.load_state_dict(saved["optimizer"])
        first_epoch, partial, start_sha1 = saved["epoch"], saved["partial"], saved["start_weights_sha1"]
        print(f"resuming {desc} in epoch {first_epoch + 1} at step {partial['step']} from {partial_path}")
    for epoch in range(first_epoch, epochs):
        def save_partial(state: dict, epoch: int = epoch) -> None:
            save_checkpoint(partial_path, model, optimizer, config, epoch, {}, stage=f"{desc} (interrupted)",
                            partial=state, start_weights_sha1=start_sha1)
        stats = train_epoch(model, optimizer, images, labels, generator=data_order, desc=desc, partial=partial,
                            save_partial=save_partial, **train_kwargs)
        partial = None
        stats.update(evaluate(model))
        print(format_stats(f"{desc} epoch {epoch + 1}/{epochs}", stats))
    if is_main() and os.path.exists(partial_path):
        os.remove(partial_path)
    return {**stats, "start_weights_sha1": start_sha1}


def train_erm(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
              epochs: int, generator: torch.Generator, evaluate: Callable[[nn.Module], dict], config: dict,
              best_path: str, last_path: str, resume: bool, **train_kwargs) -> list[dict]:
    """ERM training: after every epoch the best-validation model goes to ``best_path`` and the full state
    (weights, optimizer, data-order generator, history) to ``last_path``; Ctrl-C also saves the interrupted
    epoch there. ``resume`` continues exactly from ``last_path``. Returns the per-epoch history."""
    from checkpoint import load_weights, resumable, save_checkpoint
    history, best, start, partial = [], -1.0, 0, None
    last = resumable(last_path, config) if resume else None
    if last is not None:
        load_weights(model, last, last_path)
        optimizer.load_state_dict(last["optimizer"])
        generator.set_state(last["generator_state"])
        history, best, start, partial = last["metrics"]["history"], last["best"], last["epoch"], last.get("partial")
        where = f"in ERM epoch {start + 1} at step {partial['step']}" if partial else f"after ERM epoch {start}"
        print(f"resuming {where} from {last_path}")
    for epoch in range(start, epochs):
        def save_partial(state: dict, epoch: int = epoch) -> None:
            save_checkpoint(last_path, model, optimizer, config, epoch, {"history": history}, stage="erm",
                            best=best, generator_state=generator.get_state(), partial=state)
        desc = f"ERM epoch {epoch + 1}/{epochs}"
        stats = train_epoch(model, optimizer, images, labels, generator=generator, epoch=epoch, desc=desc,
                            partial=partial, save_partial=save_partial, **train_kwargs)
        partial = None
        stats.update(evaluate(model))
        history.append({"epoch": epoch + 1, **stats})
        print(format_stats(desc, stats))
        score = stats.get("val_accuracy", stats.get("test_accuracy"))
        if score > best:  # the paper masks with the best validation epoch
            best = score
            save_checkpoint(best_path, model, optimizer, config, epoch + 1, {**stats, "history": history}, stage="erm")
        save_checkpoint(last_path, model, optimizer, config, epoch + 1, {"history": history}, stage="erm",
                        best=best, generator_state=generator.get_state())
    return history
