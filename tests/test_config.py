import pytest
import torch

from masktune.console import UserError
from masktune.device import pick_device
from masktune.recipes import check_run_settings, configure, parse_value


def variables():
    return {
        "batch_size": 4,
        "learning_rate": 0.001,
        "masking": "attention",
        "controls": True,
        "coverages": [0.8, 0.9],
        "names": ["a"],
        "_private": 1,
        "torch": torch,
    }


def test_overrides_are_converted_to_the_default_type():
    v = variables()
    config = configure(
        v,
        [
            "--batch_size=64",
            "--learning_rate=1e-2",
            "--controls=false",
            "--coverages=[0.5,1]",
            "--names=Blond_Hair",
        ],
    )
    assert v["batch_size"] == 64 and isinstance(v["batch_size"], int)
    assert v["learning_rate"] == 0.01 and v["controls"] is False
    assert v["coverages"] == [0.5, 1.0] and v["names"] == ["Blond_Hair"]
    assert config == {
        k: v[k] for k in ("batch_size", "learning_rate", "masking", "controls", "coverages", "names")
    }


def test_bare_flag_switches_a_bool_on():
    v = dict(variables(), controls=False)
    configure(v, ["--controls"])
    assert v["controls"] is True
    with pytest.raises(UserError, match="arguments look like"):
        configure(variables(), ["--batch_size"])


def test_int_accepted_for_float_variable():
    assert parse_value("learning_rate", "1", 0.1) == 1.0


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--batch_sise=3", "unknown hyperparameter 'batch_sise'"),
        ("--batch_size=4.5", "--batch_size expects a int"),
        ("--controls=maybe", "--controls expects true or false"),
        ("--_private=2", "unknown hyperparameter"),
        ("--torch=2", "unknown hyperparameter"),
        ("batch_size=3", "arguments look like config/NAME.py or --name=value"),
    ],
)
def test_bad_overrides_fail_clearly(arg, message):
    with pytest.raises(UserError, match=message):
        configure(variables(), [arg])


def test_recipe_file_is_applied_before_the_flags(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        '"""A recipe."""\n# a comment\nbatch_size = 32\nlearning_rate = 1  # an int serves a float\n'
        'masking = "xgradcam"\ncoverages = [0.5]\n'
    )
    v = variables()
    config = configure(v, [str(recipe), "--batch_size=8"])
    assert (config["batch_size"], config["masking"], config["coverages"]) == (8, "xgradcam", [0.5])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)


@pytest.mark.parametrize(
    "text, message",
    [
        ("batch_sise = 3\n", "recipe.py: unknown hyperparameter 'batch_sise'"),
        ("batch_size = 3.5\n", "recipe.py: batch_size expects a int, got 3.5"),
        ("controls = 'yes'\n", "recipe.py: controls expects a bool"),
        ("import os\n", "recipe.py, line 1: a recipe holds only assignments"),
        ("batch_size = 2 ** 5\n", "recipe.py, line 1: the value must be a plain literal"),
        ("batch_size = (\n", "recipe.py, line 1: not valid Python"),
    ],
)
def test_bad_recipe_files_fail_in_one_line(tmp_path, text, message):
    recipe = tmp_path / "recipe.py"
    recipe.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("*", r"\*")):
        configure(variables(), [str(recipe)])
    with pytest.raises(UserError, match="cannot read recipe file"):
        configure(variables(), [str(tmp_path / "missing.py")])


def test_run_settings_are_accepted_when_equal_and_refused_when_different(tmp_path):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("num_epochs = 6\nshortcut = 'square'\n")
    config, claims = configure(variables(), [str(recipe), "--seed=1", "--batch_size=9"], run_settings=True)
    assert config["batch_size"] == 9 and claims == {"num_epochs": 6, "shortcut": "square", "seed": "1"}
    run = {"num_epochs": 6, "shortcut": "square", "seed": 1}
    check_run_settings(claims, run, "checkpoints")  # equal: accepted
    with pytest.raises(UserError, match=r"seed=2 differs from the run in checkpoints \(seed=1\)"):
        check_run_settings({"seed": "2"}, run, "checkpoints")
    with pytest.raises(UserError, match="unknown hyperparameter 'sed'"):
        check_run_settings({"sed": "1"}, run, "checkpoints")


def test_device_selection():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            pick_device("cuda")
