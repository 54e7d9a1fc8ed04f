"""Multi-process runs under ``torchrun``: one process per GPU (NCCL) or per CPU worker (Gloo).

Every process runs the whole script on the whole (in-memory) data set with the same seed, so all of them
draw the same batch order and augmentation; each trains on its slice of every batch (DistributedDataParallel
averages the gradients) and predicts or masks a contiguous slice of every image set, gathered afterwards.
Only rank 0 prints, draws progress bars and writes checkpoints, figures and tables. Without torchrun every
function here is the single-process identity.

    torchrun --nproc_per_node=2 vgg.py --device=cpu     # Gloo, 2 CPU processes
    torchrun --nproc_per_node=8 vgg.py                  # NCCL, 8 GPUs of one node
"""

import atexit
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); return this process's device.
    Non-zero ranks print nothing (their stdout goes to /dev/null)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def batch_slice(batch: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch (every world_size-th row)."""
    return batch[rank() :: world_size()] if dist.is_initialized() else batch


def wrap(model: nn.Module) -> nn.Module:
    """The model for a training step: its DistributedDataParallel wrapper when distributed (built on first use
    and kept with the model), else the model itself."""
    if not dist.is_initialized():
        return model
    if "_ddp" not in model.__dict__:  # a plain attribute, not a submodule: the state dict is unchanged
        device = next(model.parameters()).device
        model.__dict__["_ddp"] = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    return model.__dict__["_ddp"]


def _share(n: int) -> int:
    """Rows per process when ``n`` items are split into contiguous shares (the last one may be shorter)."""
    return -(-n // world_size())


def _communication_device() -> torch.device:
    """Where collective operations need their tensors: this GPU for NCCL, the CPU for Gloo."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def my_range(n: int) -> range:
    """This process's contiguous share of ``n`` items (for prediction and masking)."""
    share = _share(n)
    return range(min(rank() * share, n), min((rank() + 1) * share, n))


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every process's ``my_range`` rows in rank order: the full (n, ...) tensor everywhere."""
    if not dist.is_initialized():
        return local
    padded = torch.zeros((_share(n), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    padded = padded.to(_communication_device())
    if padded.dtype == torch.bool:  # not every backend reduces or gathers bools
        padded = padded.to(torch.uint8)
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded)
    return torch.cat(pieces)[:n].to(local.device, local.dtype)


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over the processes."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=_communication_device())
    dist.all_reduce(total)
    return total.tolist()
