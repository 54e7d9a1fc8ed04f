"""The training and inference loops every script shares: ``train_epoch`` and ``predict``."""
import hashlib
import math
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError, progress
from data import augment_flip_crop, batch_order, normalize


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Correct predictions: argmax for class labels; for 0/1 attribute labels, correct attributes / A."""
    if labels.is_floating_point():
        return ((logits > 0) == (labels > 0.5)).float().mean(1).sum().item()
    return (logits.argmax(1) == labels).sum().item()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                *, batch_size: int, device: torch.device, generator: torch.Generator, mean: tuple, std: tuple,
                augment: bool = True, loss_fn: Callable = F.cross_entropy,
                lr_schedule: Callable[[float], float] | None = None, epoch: int = 0,
                desc: str = "train") -> dict:
    """One epoch over uint8 ``images`` in ``randperm`` order (from ``generator``), batched augmentation.

    ``lr_schedule(progress)`` gives the learning rate at a fractional epoch count. A non-finite loss stops
    the run with a UserError (the caller's checkpoints stay as they were).
    """
    model.train()
    start = time.time()
    batches = batch_order(len(images), batch_size, generator)
    order_hash = hashlib.sha1()
    total_loss, total_correct, seen = 0.0, 0.0, 0
    bar = progress(batches, desc=desc)
    for step, index in enumerate(bar):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(epoch + step / len(batches))
        order_hash.update(index.numpy().tobytes())
        x = images[index.to(images.device)]
        if augment:
            x = augment_flip_crop(x, generator)
        x = normalize(x.to(device, non_blocking=True), mean, std)
        y = labels[index.to(labels.device)].to(device, non_blocking=True)
        logits, _ = model(x)
        loss = loss_fn(logits, y)
        if not math.isfinite(loss.item()):
            raise UserError(f"{desc}: loss became {loss.item()} at step {step} of epoch {epoch + 1}; lower the "
                            "learning rate (checkpoints already written are untouched)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(index)
        total_correct += count_correct(logits.detach(), y)
        seen += len(index)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{total_correct / seen:.3f}")
    return {"loss": total_loss / seen, "train_accuracy": total_correct / seen, "seconds": time.time() - start,
            "batch_order_sha1": order_hash.hexdigest()}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, mean: tuple,
            std: tuple, desc: str = "predict") -> torch.Tensor:
    """Logits for every image, in order, as a float CPU tensor (N, C)."""
    model.eval()
    outputs = []
    for index in progress(batch_order(len(images), batch_size, None), desc=desc):
        x = normalize(images[index.to(images.device)].to(device, non_blocking=True), mean, std)
        outputs.append(model(x)[0].float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)


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
             desc: str, **train_kwargs) -> dict:
    """Fine-tune ``model`` (already holding its starting weights and optimizer state) at a constant learning
    rate. The batch order and augmentation come from ``data_seed`` alone, so MaskTune and its controls see
    the same batches; the returned stats fingerprint both the starting weights and the batch order."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    start_sha1 = weights_sha1(model)
    data_order = torch.Generator().manual_seed(data_seed)
    for epoch in range(epochs):
        stats = train_epoch(model, optimizer, images, labels, generator=data_order, desc=desc, **train_kwargs)
        stats.update(evaluate(model))
        print(format_stats(f"{desc} epoch {epoch + 1}/{epochs}", stats))
    return {**stats, "start_weights_sha1": start_sha1}


def train_erm(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
              epochs: int, generator: torch.Generator, evaluate: Callable[[nn.Module], dict], config: dict,
              best_path: str, last_path: str, resume: bool, **train_kwargs) -> list[dict]:
    """ERM training: after every epoch the best-validation model goes to ``best_path`` and the full state
    (weights, optimizer, data-order generator, history) to ``last_path``, from which ``resume`` continues
    exactly. Returns the per-epoch history."""
    from checkpoint import load_weights, resumable, save_checkpoint
    history, best, start = [], -1.0, 0
    last = resumable(last_path, config) if resume else None
    if last is not None:
        load_weights(model, last, last_path)
        optimizer.load_state_dict(last["optimizer"])
        generator.set_state(last["generator_state"])
        history, best, start = last["metrics"]["history"], last["best"], last["epoch"]
        print(f"resuming after ERM epoch {start} from {last_path}")
    for epoch in range(start, epochs):
        desc = f"ERM epoch {epoch + 1}/{epochs}"
        stats = train_epoch(model, optimizer, images, labels, generator=generator, epoch=epoch, desc=desc,
                            **train_kwargs)
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
