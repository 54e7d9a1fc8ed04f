import os
import pickle

import pytest
import torch

from masktune.checkpoint import load_checkpoint, load_weights, save_checkpoint
from masktune.console import UserError
from models import VGGWithAttention


def test_round_trip_keeps_weights_config_epoch_metrics(tmp_path):
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32))[0].sum().backward()
    optimizer.step()
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, model, optimizer, {"seed": 3, "masking": "xgradcam"}, 7, {"test_accuracy": 0.5})
    state = load_checkpoint(path, "VGGWithAttention", 10)
    assert state["config"] == {"seed": 3, "masking": "xgradcam"} and state["epoch"] == 7
    assert state["metrics"]["test_accuracy"] == 0.5
    clone = load_weights(VGGWithAttention(10), state)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(clone(x)[0], model(x)[0])
    restored = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(state["optimizer"])
    assert torch.equal(
        restored.state_dict()["state"][0]["momentum_buffer"],
        optimizer.state_dict()["state"][0]["momentum_buffer"],
    )
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_wrong_class_count_and_architecture_are_refused(tmp_path):
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, VGGWithAttention(5), None, {}, 1, {})
    with pytest.raises(UserError, match="has 5 classes, expected 10"):
        load_checkpoint(path, "VGGWithAttention", 10)
    with pytest.raises(UserError, match="holds a VGGWithAttention, expected a ResNet50"):
        load_checkpoint(path, "ResNet50")
    with pytest.raises(UserError, match="does not fit"):
        load_weights(VGGWithAttention(10), load_checkpoint(path))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("content", [b"not a checkpoint at all", pickle.dumps(Exploit()), b""])
def test_non_checkpoints_and_code_running_pickles_are_refused(tmp_path, content, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable checkpoint|not a checkpoint"):
        load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, VGGWithAttention(10), None, {"run": 1}, 1, {})
    before = open(path, "rb").read()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, VGGWithAttention(10), None, {"run": 2}, 2, {})
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["config"] == {"run": 1}
    assert os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512 vs 448"),
    ],
)
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_written(tmp_path, monkeypatch, error):
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, VGGWithAttention(10), None, {"run": 1}, 1, {})
    before = open(path, "rb").read()

    def disk_fills(obj, f):
        f.write(b"\0" * 512)  # part of the file reaches the disk, then the writer fails as a full disk does
        raise error

    monkeypatch.setattr(torch, "save", disk_fills)
    with pytest.raises(UserError, match=f"could not write {path}: .*--resume=True") as raised:
        save_checkpoint(path, VGGWithAttention(10), None, {"run": 2}, 2, {})
    assert "\n" not in str(raised.value)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["m.pt"]
