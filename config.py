"""Hyperparameters as plain variables, overridable from the command line (nanoGPT style).

A script defines its hyperparameters as module-level variables, then calls ``configure(globals())``:
every ``--name=value`` argument replaces the variable of that name, converted to the type of its default.
Unknown names and values of the wrong type are one-line errors. The resulting dict is printed and saved in
every checkpoint. Errors meant for the user are ``UserError``s; ``configure`` installs a hook that prints
them as ``error: ...`` and exits with status 1 instead of a stack trace.
"""
import ast
import json
import os
import random
import sys
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from distributed import is_main

CONFIG_TYPES = (bool, int, float, str, list, type(None))


class UserError(Exception):
    """A mistake the user can fix (bad data, bad flag, bad checkpoint): printed without a stack trace."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _excepthook(kind, value, traceback) -> None:
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
        sys.exit(1)
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted: the checkpoints hold the run up to its last finished training step; run the same "
              "command with --resume=True to continue", file=sys.stderr)
        sys.exit(130)
    sys.__excepthook__(kind, value, traceback)


def parse_value(name: str, text: str, default: Any) -> Any:
    """Convert ``text`` to the type of ``default`` or raise a UserError naming the variable."""
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            check(lowered in ("true", "false", "1", "0"), f"--{name} expects true or false, got {text!r}")
            return lowered in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        if isinstance(default, list):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = [item for item in text.split(",") if item]  # --names=a,b or a single bare word
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            if default:  # keep the element type of the default list
                value = [parse_value(name, str(v), default[0]) for v in value]
            return value
        return ast.literal_eval(text) if text not in ("None", "") else None
    except ValueError:
        raise UserError(f"--{name} expects a {type(default).__name__}, got {text!r}") from None


def configure(variables: dict, argv: list[str] | None = None) -> dict:
    """Apply ``--name=value`` overrides to a script's globals; return and print the config."""
    sys.excepthook = _excepthook
    keys = [k for k, v in variables.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)
            and not isinstance(v, type)]
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print(variables.get("__doc__") or "")
            print("hyperparameters (override with --name=value):")
            for k in keys:
                print(f"  --{k}={variables[k]!r}")
            sys.exit(0)
        check(arg.startswith("--"), f"arguments look like --name=value, got {arg!r}")
        if "=" not in arg and isinstance(variables.get(arg[2:]), bool):
            arg += "=true"  # a bare --flag switches a bool on
        check("=" in arg, f"arguments look like --name=value, got {arg!r}")
        name, text = arg[2:].split("=", 1)
        check(name in keys, f"unknown hyperparameter {name!r}; known: {', '.join(keys)}")
        variables[name] = parse_value(name, text, variables[name])
    config = {k: variables[k] for k in keys}
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 prints
        print("config: " + json.dumps(config))
    return config


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    check(available.get(device.type, False), f"device {name!r} is not available on this machine")
    if device.type == "cuda" and device.index is not None:
        check(device.index < torch.cuda.device_count(), f"device {name!r} does not exist here")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX instructions
    (elsewhere bf16 would be emulated, slower than fp32)."""
    if device.type == "cuda":
        return True
    cpu_checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in cpu_checks)


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """bf16 autocast when ``amp`` and bf16 is native on ``device`` (no loss scaling needed); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and native_bf16(device))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and fail clearly when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {path!r}: {e.strerror}") from None
    check(os.access(path, os.W_OK), f"folder {path!r} is not writable")
    return path


def progress(iterable, desc: str = "", **kwargs):
    """A progress bar on terminals; silent when output goes to a file or CI log."""
    return tqdm(iterable, desc=desc, leave=False, disable=None if is_main() else True, dynamic_ncols=True, **kwargs)
