import pytest
import torch

from config import UserError, configure, parse_value, pick_device


def variables():
    return {"batch_size": 4, "learning_rate": 0.001, "masking": "attention", "controls": True,
            "coverages": [0.8, 0.9], "names": ["a"], "_private": 1, "torch": torch}


def test_overrides_are_converted_to_the_default_type():
    v = variables()
    config = configure(v, ["--batch_size=64", "--learning_rate=1e-2", "--controls=false",
                           "--coverages=[0.5,1]", "--names=Blond_Hair"])
    assert v["batch_size"] == 64 and isinstance(v["batch_size"], int)
    assert v["learning_rate"] == 0.01 and v["controls"] is False
    assert v["coverages"] == [0.5, 1.0] and v["names"] == ["Blond_Hair"]
    assert config == {k: v[k] for k in ("batch_size", "learning_rate", "masking", "controls", "coverages", "names")}


def test_bare_flag_switches_a_bool_on():
    v = dict(variables(), controls=False)
    configure(v, ["--controls"])
    assert v["controls"] is True
    with pytest.raises(UserError, match="arguments look like"):
        configure(variables(), ["--batch_size"])


def test_int_accepted_for_float_variable():
    assert parse_value("learning_rate", "1", 0.1) == 1.0


@pytest.mark.parametrize("arg, message", [
    ("--batch_sise=3", "unknown hyperparameter 'batch_sise'"),
    ("--batch_size=4.5", "--batch_size expects a int"),
    ("--controls=maybe", "--controls expects true or false"),
    ("--_private=2", "unknown hyperparameter"),
    ("--torch=2", "unknown hyperparameter"),
    ("batch_size=3", "arguments look like --name=value"),
])
def test_bad_overrides_fail_clearly(arg, message):
    with pytest.raises(UserError, match=message):
        configure(variables(), [arg])


def test_device_selection():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available"):
            pick_device("cuda")
