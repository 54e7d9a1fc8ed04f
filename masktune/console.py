"""What the user sees in the terminal: one-line errors instead of stack traces, and progress bars.

A mistake the user can fix (a bad flag, missing data, the wrong checkpoint) raises ``UserError``; the hook
that ``install_error_hook`` sets prints it as ``error: ...`` and exits with status 1. Ctrl-C exits with 130
and says how to resume.
"""

import os
import sys

from tqdm import tqdm


class UserError(Exception):
    """A mistake the user can fix: printed as one line, without a stack trace."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices``: a UserError naming the setting otherwise."""
    check(value in choices, f"unknown {name} {value!r}; use one of {', '.join(map(str, choices))}")


def _error_hook(kind, value, traceback) -> None:
    if issubclass(kind, UserError):
        print(f"error: {value}", file=sys.stderr)
        sys.exit(1)
    if issubclass(kind, KeyboardInterrupt):
        print(
            "interrupted: the checkpoints hold the run up to its last finished epoch; run the same command "
            "with --resume=True to continue",
            file=sys.stderr,
        )
        sys.exit(130)
    sys.__excepthook__(kind, value, traceback)


def install_error_hook() -> None:
    sys.excepthook = _error_hook


def is_main_process() -> bool:
    """Rank 0 under torchrun (the process that prints), or the only process."""
    return os.environ.get("RANK", "0") == "0"


def progress(iterable, desc: str = "", **kwargs):
    """A progress bar on terminals (rank 0 only); silent when output goes to a file or a CI log."""
    return tqdm(
        iterable,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=None if is_main_process() else True,
        **kwargs,
    )
