"""Checkpoint I/O: atomic writes, ``weights_only`` loads, a clear refusal of the wrong checkpoint, and the
output folders."""

import copy
import os
import pickle
import tempfile
import warnings
from typing import Any

import torch
import torch.nn as nn

from masktune.console import UserError, check
from masktune.device import pick_device, prepare_model
from masktune.distributed import barrier, is_main
from masktune.recipes import check_run_settings

FORMAT_VERSION = 1


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict,
    epoch: int,
    metrics: dict,
    **extra: Any,
) -> None:
    """Write a checkpoint atomically (temp file in the same folder, fsync, rename).

    A crash mid-write leaves the previous file at ``path`` intact. Under torchrun only rank 0 writes and
    the others wait until the file is there.
    """
    if not is_main():
        barrier()
        return
    state = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "num_classes": int(model.num_classes),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "config": dict(config),
        "epoch": int(epoch),
        "metrics": dict(metrics),
        **extra,
    }
    atomic_save(state, path)
    barrier()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, rename: ``path`` is never half-written. A
    write that fails (a full disk: ``OSError``, or torch's ``RuntimeError`` from its zip writer) is one
    ``UserError`` naming ``path``; the files written before it are left as they were."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(error, (OSError, RuntimeError)):
            reason = (getattr(error, "strerror", None) or str(error)).strip().splitlines()[0]
            raise UserError(
                f"could not write {path}: {reason}; the checkpoints written before are intact: free some "
                "space and run the same command with --resume=True"
            ) from error
        raise


def load_checkpoint(path: str, architecture: str | None = None, num_classes: int | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check it is the one expected."""
    check(os.path.isfile(path), f"checkpoint {path!r} not found; run the training script first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"{path!r} is not a readable checkpoint (it holds objects other than tensors and plain "
            "data; refused without running them)"
        ) from None
    except (RuntimeError, EOFError, ValueError, AttributeError, ImportError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path!r} is not a readable checkpoint ({first_line[:120]})") from None
    check(
        isinstance(state, dict) and "format_version" in state and "model" in state,
        f"{path!r} is not a checkpoint of this project",
    )
    check(
        state["format_version"] == FORMAT_VERSION,
        f"{path!r} has checkpoint format {state['format_version']}, this code reads format {FORMAT_VERSION}",
    )
    if architecture is not None:
        check(
            state["architecture"] == architecture,
            f"{path!r} holds a {state['architecture']}, expected a {architecture}",
        )
    if num_classes is not None:
        check(
            state["num_classes"] == num_classes,
            f"{path!r} has {state['num_classes']} classes, expected {num_classes}",
        )
    return state


def load_weights(model: nn.Module, state: dict, path: str = "checkpoint") -> nn.Module:
    """Copy checkpoint weights into ``model``; a mismatch names the differing tensors."""
    check(
        state["architecture"] == type(model).__name__,
        f"{path} holds a {state['architecture']}, expected a {type(model).__name__}",
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(
            f"{path} does not fit {type(model).__name__}: {str(e).splitlines()[1].strip()[:200]}"
        ) from None
    return model


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a copy of ``state``'s optimizer state: loaded as it is, on the CPU the optimizer would keep the
    checkpoint's own tensors as its momentum, and one fine-tune would change the next one's start."""
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


# settings that may change between a run and its resumption (they do not change the results)
NOT_RUN_SETTINGS = ("resume", "device", "eval_batch_size", "out_dir", "cache_dir", "checkpoint_dir")


def differing_settings(theirs: dict, ours: dict) -> list[str]:
    """The run settings on which two configs differ (not those that may change between sessions)."""
    keys = {**theirs, **ours}.keys() - set(NOT_RUN_SETTINGS)
    return sorted(k for k in keys if theirs.get(k) != ours.get(k))


def resumable(path: str, config: dict) -> dict | None:
    """The checkpoint at ``path`` when it belongs to this same run (to resume from), None when absent."""
    if not os.path.exists(path):
        return None
    state = load_checkpoint(path)
    theirs = state["config"]
    differing = differing_settings(theirs, config)
    check(
        not differing,
        f"cannot resume from {path!r}: it was written with other settings ("
        + ", ".join(f"{k}={theirs.get(k)!r}" for k in differing)
        + "); use another checkpoint_dir or resume=False",
    )
    return state


# The models a MaskTune run writes, as ``{prefix}_{name}.pt``, and how results name them.
RUN_MODELS = {
    "initial": "ERM",
    "finetuned": "MaskTune",
    "nomask": "no-mask control",
    "randommask": "random-mask control",
    "round1": "MaskTune, round 1",  # mask_rounds > 1: the fine-tune on the first masks (mask_rounds = 1's)
}
OPTIONAL_MODELS = ("nomask", "randommask", "round1")  # trained by some runs only


def load_run(
    checkpoint_dir: str, prefix: str, device: torch.device, architectures: tuple[type, ...]
) -> tuple[dict, dict]:
    """Load a run's models (ERM and MaskTune required, controls when present): ({name: model}, {name: state}).
    Each must be one of the model classes ``architectures``, built with its number of classes."""
    classes = {architecture.__name__: architecture for architecture in architectures}
    models, states = {}, {}
    for name in RUN_MODELS:
        path = os.path.join(checkpoint_dir, f"{prefix}_{name}.pt")
        if name in OPTIONAL_MODELS and not os.path.exists(path):
            continue
        states[name] = load_checkpoint(path)
        check(
            states[name]["architecture"] in classes,
            f"{path!r} holds a {states[name]['architecture']}, expected a {' or '.join(classes)}",
        )
        model = classes[states[name]["architecture"]](states[name]["num_classes"])
        fast = states[name]["config"].get("channels_last", False)  # as the run trained it
        models[name] = prepare_model(
            load_weights(model, states[name], path), device, channels_last=fast
        ).eval()
    for name in OPTIONAL_MODELS:
        if name in states:
            check(
                not differing_settings(states[name]["config"], states["finetuned"]["config"]),
                f"{prefix}_{name}.pt comes from another run than {prefix}_finetuned.pt",
            )
    return models, states


def load_run_as_trained(
    config: dict, claims: dict, prefix: str, architectures: tuple[type, ...]
) -> tuple[torch.device, dict, dict, dict]:
    """An evaluation script's start, from its ``config``: its ``out_dir`` made, its ``device`` picked, and
    the run in its ``checkpoint_dir`` loaded there (``load_run``): (device, {name: model}, {name: state}, the
    config the run was trained with). The run's data is read from ``data_dir`` where one is given. The
    settings the script was given (``claims``) must equal the run's."""
    ensure_writable_dir(config["out_dir"])
    device = pick_device(config["device"])
    models, states = load_run(config["checkpoint_dir"], prefix, device, architectures)
    data = {"data_dir": config["data_dir"]} if config["data_dir"] else {}
    run_config = dict(states["finetuned"]["config"], **data)
    check_run_settings(claims, run_config, config["checkpoint_dir"])
    return device, models, states, run_config


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and fail clearly when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {path!r}: {e.strerror}") from None
    check(os.access(path, os.W_OK), f"folder {path!r} is not writable")
    return path
