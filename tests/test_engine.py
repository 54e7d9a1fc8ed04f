"""The training loop: no host sync per step, epoch checkpoints that resume bit for bit, best-epoch choice,
and models that own their input normalisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from masktune import engine
from masktune.checkpoint import load_checkpoint
from masktune.console import UserError
from masktune.engine import Stage, TrainingSet, train, train_epoch
from models import ResNet50, VGGWithAttention


def tiny_data(n: int = 64):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(n) % 10


def test_the_loop_waits_for_the_device_only_at_logging_intervals(monkeypatch):
    images, labels = tiny_data(160)
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reads = []
    for method in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(
            torch.Tensor,
            method,
            lambda self, *a, _f=original, _m=method, **k: (reads.append(_m), _f(self, *a, **k))[1],
        )
    monkeypatch.setattr(engine, "LOG_EVERY", 4)
    data = TrainingSet(images, labels, F.cross_entropy, batch_size=8)
    stats = train_epoch(model, optimizer, data, torch.Generator().manual_seed(0))
    steps = 20
    # reads of the batch order (its fingerprint), one per logging interval, one at the end: not one per step
    assert len(reads) <= 2 + math.ceil(steps / 4) + 1, reads
    assert 0 <= stats["train_accuracy"] <= 1 and math.isfinite(stats["loss"])


def test_a_diverging_loss_stops_with_a_clear_error():
    images, labels = tiny_data()
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e6)
    with pytest.raises(UserError, match="the loss became .* lower the learning rate"):
        for _ in range(3):
            train_epoch(model, optimizer, TrainingSet(images, labels, F.cross_entropy, 16), torch.Generator())


def run_stage(tmp_path, epochs: int, resume: bool, stop_after: int | None = None, scores=None):
    """ERM-style training of a tiny model for ``epochs``; Ctrl-C (KeyboardInterrupt) right after epoch
    ``stop_after`` has been saved; ``scores`` are the validation accuracies evaluate returns."""
    torch.manual_seed(0)
    images, labels = tiny_data()
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    calls = []

    def evaluate(m):
        calls.append(1)
        if stop_after is not None and len(calls) == stop_after + 1:
            raise KeyboardInterrupt
        return {"val_accuracy": scores[len(calls) - 1] if scores else 0.5}

    train(
        model,
        optimizer,
        TrainingSet(images, labels, F.cross_entropy, batch_size=16),
        Stage("ERM", str(tmp_path / "last.pt"), {"seed": 0}, resume, best_path=str(tmp_path / "best.pt")),
        epochs=epochs,
        lr_at=lambda done: 0.01,
        generator=torch.Generator().manual_seed(0),
        evaluate=evaluate,
    )
    return model


def test_ctrl_c_keeps_the_last_finished_epoch_and_resume_is_bit_for_bit(tmp_path):
    reference = run_stage(tmp_path / "reference", 3, resume=False)
    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "run", 3, resume=False, stop_after=2)
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["epoch"] == 2
    resumed = run_stage(tmp_path / "run", 3, resume=True)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], tensor), key

    def history(folder):  # every number but the times
        return [
            {k: v for k, v in h.items() if k != "seconds"}
            for h in load_checkpoint(str(tmp_path / folder / "last.pt"))["metrics"]["history"]
        ]

    assert history("run") == history("reference")


def test_the_best_epoch_is_the_latest_at_the_best_validation_accuracy(tmp_path):
    run_stage(tmp_path, 4, resume=False, scores=[0.5, 0.9, 0.9, 0.7])
    assert load_checkpoint(str(tmp_path / "best.pt"))["epoch"] == 3  # epochs 2 and 3 tie: the later one


def test_models_normalise_their_own_inputs_and_keep_the_state_dict_names():
    model = VGGWithAttention(10)
    assert not {"mean", "std"} & set(model.state_dict())  # checkpoints from before load unchanged
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = model.conv1((images.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(model.conv1(model.normalize(images)), expected)
    resnet = ResNet50(3)
    assert torch.allclose(resnet.normalize(images)[:, 0], (images[:, 0].float() / 255 - 0.485) / 0.229)
    assert "mean" not in resnet.state_dict() and "backbone.7.2.bn3.running_var" in resnet.state_dict()


def test_fine_tuning_schedules_by_hand():
    """constant stays at the rate; linear (the default) falls from it to 0 over the fine-tune; one_cycle
    warms up over the first quarter, then falls to 0."""
    constant, linear = engine.finetune_lr(0.01, 2, "constant"), engine.finetune_lr(0.01, 2, "linear")
    one_cycle = engine.finetune_lr(0.01, 4, "one_cycle")
    assert constant(0.0) == constant(1.9) == 0.01
    assert linear(0.0) == pytest.approx(0.01) and linear(1.0) == pytest.approx(0.005)
    assert linear(1.99) == pytest.approx(0.01 * 0.01 / 2)
    assert one_cycle(0.5) == pytest.approx(0.01 * 0.501) and one_cycle(1.0) == pytest.approx(0.01)
    assert one_cycle(2.5) == pytest.approx(0.01 * 1.5 / 3)
    assert engine.finetune_length(3600, 128, 1, 500) == 18 and engine.finetune_length(45000, 128, 1, 500) == 2


def test_the_loss_is_the_scripts_and_the_accuracy_does_not_depend_on_it():
    """A loss handed to the loop is what it trains with (here: a constant, so no weight moves), and the
    reported accuracy is still the plain accuracy of the predictions."""
    images, labels = tiny_data()
    model = VGGWithAttention(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def no_signal(logits, labels):
        return (logits * 0).sum() + 7.0

    stats = train_epoch(
        model, optimizer, TrainingSet(images, labels, no_signal, 16, augment=False), torch.Generator()
    )
    assert stats["loss"] == pytest.approx(7.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    predicted = model.eval()(images)[0].argmax(1)
    assert stats["train_accuracy"] == pytest.approx((predicted == labels).float().mean().item())


def test_a_last_batch_of_one_image_joins_the_one_before():
    """BatchNorm cannot train on one image: 33 images in batches of 16 are drawn as 16 and 17."""
    from masktune.batches import draw_epoch

    batches = draw_epoch(33, 16, torch.Generator().manual_seed(0), True, torch.device("cpu"))
    assert [len(b.index) for b in batches] == [16, 17] and sorted(
        torch.cat([b.index for b in batches]).tolist()
    ) == list(range(33))
    assert [len(b.flips) for b in batches] == [16, 17] and [b.shifts.shape[1] for b in batches] == [16, 17]
    assert [len(b.index) for b in draw_epoch(34, 16, torch.Generator(), False, torch.device("cpu"))] == [
        16,
        16,
        2,
    ]
