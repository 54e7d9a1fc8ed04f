"""Hyperparameters as plain variables, overridden by recipe files and then by flags (nanoGPT style).

A script defines its hyperparameters as module-level variables, then calls ``configure(globals())``:

    python vgg.py config/cifar_square.py --seed=1 --masking=xgradcam

applies the recipe file's assignments (``name = value``, one per line, plain Python literals), then every
``--name=value``, each converted to the type of the variable's default. Unknown names and values of the
wrong type, in a file or a flag, are one-line errors. The resulting dict is printed and saved in every
checkpoint.

Scripts that read a run's settings from its checkpoints (evaluation, selective classification) accept
settings of the run too: ``check_run_settings`` compares them with the checkpoint's values, so one set of
flags and recipe files serves every script of a run.
"""

import ast
import json
import sys
from typing import Any

from masktune.console import UserError, check, install_error_hook, is_main_process

CONFIG_TYPES = (bool, int, float, str, list, type(None))


def parse_value(name: str, text: str, default: Any) -> Any:
    """Convert the flag text ``text`` to the type of ``default``, or raise a UserError naming the variable."""
    try:
        if isinstance(default, bool):
            check(
                text.lower() in ("true", "false", "1", "0"), f"--{name} expects true or false, got {text!r}"
            )
            return text.lower() in ("true", "1")
        if isinstance(default, (int, float, str)):
            return type(default)(text)
        if isinstance(default, list):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = [item for item in text.split(",") if item]  # --names=a,b or a single bare word
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            return [parse_value(name, str(v), default[0]) for v in value] if default else value
        return ast.literal_eval(text) if text not in ("None", "") else None
    except ValueError:
        raise UserError(f"--{name} expects a {type(default).__name__}, got {text!r}") from None


def typed(name: str, value: Any, default: Any, where: str) -> Any:
    """A recipe file's literal ``value`` checked against the type of ``default`` (an int serves a float)."""
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, list) and isinstance(value, list) and default:
        return [typed(name, v, default[0], where) for v in value]
    expected = type(default)
    check(
        default is None or type(value) is expected,
        f"{where}: {name} expects a {expected.__name__}, got {value!r}",
    )
    return value


def read_recipe(path: str) -> dict:
    """The ``name = literal`` assignments of a recipe file, in order."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
    except OSError as e:
        raise UserError(f"cannot read recipe file {path!r}: {e.strerror}") from None
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: not valid Python") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        simple = (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        )
        check(simple, f"{path}, line {node.lineno}: a recipe holds only assignments 'name = value'")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"{path}, line {node.lineno}: the value must be a plain literal") from None
    return values


def configure(variables: dict, argv: list[str] | None = None, run_settings: bool = False):
    """Apply recipe files and ``--name=value`` overrides to a script's globals; print and return the config.

    With ``run_settings``, names the script does not define are kept (as text, or as recipe values) and
    returned beside the config for ``check_run_settings``: ``(config, claims)``.
    """
    install_error_hook()
    keys = [k for k, v in variables.items() if not k.startswith("_") and isinstance(v, CONFIG_TYPES)]
    claims = {}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("-h", "--help"):
            print(variables.get("__doc__") or "")
            print("hyperparameters (set them in a recipe file config/NAME.py, or as --name=value):")
            for k in keys:
                print(f"  --{k}={variables[k]!r}")
            raise SystemExit(0)
        if not arg.startswith("--"):
            check(arg.endswith(".py"), f"arguments look like config/NAME.py or --name=value, got {arg!r}")
            for name, value in read_recipe(arg).items():
                if name in keys:
                    variables[name] = typed(name, value, variables[name], arg)
                else:
                    check(run_settings, f"{arg}: unknown hyperparameter {name!r}; known: {', '.join(keys)}")
                    claims[name] = value
            continue
        if "=" not in arg and isinstance(variables.get(arg[2:]), bool):
            arg += "=true"  # a bare --flag switches a bool on
        check("=" in arg, f"arguments look like --name=value, got {arg!r}")
        name, text = arg[2:].split("=", 1)
        if name in keys:
            variables[name] = parse_value(name, text, variables[name])
        else:
            check(run_settings, f"unknown hyperparameter {name!r}; known: {', '.join(keys)}")
            claims[name] = text
    config = {k: variables[k] for k in keys}
    if is_main_process():  # under torchrun, only rank 0 prints
        print("config: " + json.dumps(config))
    return (config, claims) if run_settings else config


def check_run_settings(claims: dict, run_config: dict, where: str) -> None:
    """Settings given to an evaluation script must equal those the run in ``where`` was trained with."""
    for name, value in claims.items():
        check(
            name in run_config,
            f"unknown hyperparameter {name!r} (neither this script's nor the run's in {where})",
        )
        ours = (
            parse_value(name, value, run_config[name])
            if isinstance(value, str)
            else typed(name, value, run_config[name], "recipe")
        )
        check(
            ours == run_config[name],
            f"{name}={ours!r} differs from the run in {where} ({name}="
            f"{run_config[name]!r}): point checkpoint_dir at the run trained with it",
        )
