"""Interrupted runs resume exactly; every user mistake is one clear line, exit 1, and nothing written is lost."""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_checkpoint, save_checkpoint
from conftest import ROOT, run_script, write_celeba, write_cifar_pickles, write_image_folder
from models import VGGWithAttention

TINY = ["--num_epochs=5", "--batch_size=16", "--eval_batch_size=100", "--val_size=50"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cifar_dir):
    ckpt = str(tmp_path_factory.mktemp("reference"))
    run_script("vgg.py", f"--data_dir={cifar_dir}", f"--checkpoint_dir={ckpt}", f"--out_dir={ckpt}/out", *TINY)
    return ckpt


def interrupt_and_resume(script: str, args: list, prefix: str, folder, reference: str, sig: int) -> None:
    """Stop ``script`` with ``sig`` after its first ERM epoch, resume it, and check that every final
    checkpoint equals the uninterrupted run's in ``reference`` bit for bit (in another process: a seeded
    CPU run is exactly repeatable)."""
    command = [sys.executable, os.path.join(ROOT, script), *args, f"--checkpoint_dir={folder}", f"--out_dir={folder}/out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while not os.path.exists(folder / f"{prefix}_last.pt") and time.time() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be interrupted"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert not os.path.exists(folder / f"{prefix}_finetuned.pt")
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "--resume=True" in stderr and "Traceback" not in stderr
    resumed = run_script(script, *command[2:], "--resume=True")
    assert "resuming after ERM epoch" in resumed.stdout or "resuming in ERM epoch" in resumed.stdout
    for name in ("initial", "finetuned", "nomask", "randommask"):
        ours = load_checkpoint(str(folder / f"{prefix}_{name}.pt"))
        theirs = load_checkpoint(os.path.join(reference, f"{prefix}_{name}.pt"))
        assert ours["metrics"]["test_accuracy"] == theirs["metrics"]["test_accuracy"]
        for key, tensor in theirs["model"].items():
            assert torch.equal(ours["model"][key], tensor), (name, key)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(reference_run, cifar_dir, tmp_path, sig):
    """vgg.py killed (SIGKILL) or interrupted (Ctrl-C) after its first epochs, then resumed."""
    interrupt_and_resume("vgg.py", [f"--data_dir={cifar_dir}", *TINY], "vgg", tmp_path, reference_run, sig)


def test_killed_resnet50_run_resumes_to_the_same_result(tmp_path):
    data = write_celeba(str(tmp_path / "data"))
    args = [f"--data_dir={data}", "--pretrained=False", "--image_size=32", "--num_epochs=2", "--batch_size=8",
            "--eval_batch_size=32", "--target_attributes=[\"Blond_Hair\",\"Smiling\"]"]
    run_script("resnet50.py", *args, f"--checkpoint_dir={tmp_path}/reference", f"--out_dir={tmp_path}/reference/out")
    (tmp_path / "run").mkdir()
    interrupt_and_resume("resnet50.py", args, "resnet50", tmp_path / "run", str(tmp_path / "reference"), signal.SIGKILL)


def _tiny_training(tmp_path, stage: str, interrupt_at: int | None = None, resume: bool = False):
    """Two epochs of ERM or fine-tuning on 64 images; Ctrl-C (a real SIGINT) arrives during training step
    ``interrupt_at`` (counted from 1), i.e. in the middle of the second epoch."""
    import torch.nn.functional as F
    from engine import finetune, train_erm
    from models import VGG_MEAN, VGG_STD
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (64,))
    model = VGGWithAttention(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    steps = [0]

    def loss_fn(logits, y):
        steps[0] += 1
        if steps[0] == interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(logits, y)

    common = dict(batch_size=16, device=torch.device("cpu"), mean=VGG_MEAN, std=VGG_STD, loss_fn=loss_fn,
                  evaluate=lambda m: {"val_accuracy": 0.5}, config={"seed": 0}, resume=resume)
    if stage == "erm":
        train_erm(model, optimizer, images, labels, epochs=2, generator=torch.Generator().manual_seed(0),
                  best_path=str(tmp_path / "best.pt"), last_path=str(tmp_path / "last.pt"), **common)
    else:
        finetune(model, optimizer, images, labels, epochs=2, learning_rate=0.01, data_seed=1, desc="fine-tune",
                 partial_path=str(tmp_path / "partial.pt"), **common)
    return model


@pytest.mark.parametrize("stage", ["erm", "finetune"])
def test_ctrl_c_mid_epoch_saves_the_step_and_resumes_exactly(tmp_path, stage):
    reference = _tiny_training(tmp_path / "reference", stage)
    with pytest.raises(KeyboardInterrupt):
        _tiny_training(tmp_path, stage, interrupt_at=6)
    saved = load_checkpoint(str(tmp_path / ("last.pt" if stage == "erm" else "partial.pt")))
    assert saved["epoch"] == 1 and saved["partial"]["step"] == 2  # after step 2 of the second epoch's 4
    resumed = _tiny_training(tmp_path, stage, resume=True)
    for key, tensor in reference.state_dict().items():  # bit for bit
        assert torch.equal(resumed.state_dict()[key], tensor), key
    assert not os.path.exists(tmp_path / "partial.pt")  # removed once the fine-tune is complete


def test_resume_refuses_another_config(reference_run, cifar_dir):
    result = run_script("vgg.py", f"--data_dir={cifar_dir}", f"--checkpoint_dir={reference_run}", "--resume=True",
                        *TINY, "--learning_rate=0.5", check=False)
    assert result.returncode == 1 and "cannot resume" in result.stderr and "learning_rate=0.02" in result.stderr


def _digest(folder: str) -> dict:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(folder)) if f.endswith(".pt")}


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/masktune-pwned",))


def bad_inputs(tmp: str, cifar_dir: str) -> list:
    """(script, arguments, expected message) for each row of the bad-input matrix."""
    os.makedirs(f"{tmp}/empty/train")
    write_image_folder(f"{tmp}/notest", per_class=2, per_class_test=1)
    import shutil
    shutil.rmtree(f"{tmp}/notest/test")
    write_image_folder(f"{tmp}/emptyclass", per_class=2, per_class_test=1)
    os.makedirs(f"{tmp}/emptyclass/train/zebra")
    write_image_folder(f"{tmp}/mismatch", per_class=2, per_class_test=1)
    os.rename(f"{tmp}/mismatch/test/frog", f"{tmp}/mismatch/test/toad")
    write_image_folder(f"{tmp}/corrupt", per_class=2, per_class_test=1)
    open(f"{tmp}/corrupt/train/dog/0001.png", "wb").write(b"\x89PNG\r\n\x1a\n truncated")
    write_cifar_pickles(f"{tmp}/truncated", n_train=50, n_test=10)
    path = f"{tmp}/truncated/cifar-10-batches-py/test_batch"
    open(path, "wb").write(open(path, "rb").read()[:100])
    write_celeba(f"{tmp}/celeba_csv", n=12)
    open(f"{tmp}/celeba_csv/list_eval_partition.csv", "w").write("image_id,partition\n000001.jpg\n")
    write_celeba(f"{tmp}/celeba", n=12)
    os.makedirs(f"{tmp}/ckpt_text")
    open(f"{tmp}/ckpt_text/vgg_initial.pt", "w").write("not a checkpoint")
    open(f"{tmp}/ckpt_text/vgg_finetuned.pt", "w").write("not a checkpoint")
    os.makedirs(f"{tmp}/ckpt_exploit")
    for name in ("initial", "finetuned"):
        pickle.dump(Exploit(), open(f"{tmp}/ckpt_exploit/vgg_{name}.pt", "wb"))
    os.makedirs(f"{tmp}/ckpt_classes")
    for name in ("initial", "finetuned"):
        save_checkpoint(f"{tmp}/ckpt_classes/vgg_{name}.pt", VGGWithAttention(10), None, {}, 1, {})
    os.makedirs(f"{tmp}/ckpt_arch")
    from models import ResNet50
    for name in ("initial", "finetuned"):
        save_checkpoint(f"{tmp}/ckpt_arch/vgg_{name}.pt", ResNet50(10), None, {}, 1, {})
    open(f"{tmp}/a_file", "w").write("x")
    celeba = [f"--data_dir={tmp}/celeba", "--pretrained=False", "--image_size=32"]
    return [
        ("vgg.py", [f"--data_dir={tmp}/notest"], "notest/test' not found"),
        ("vgg.py", [f"--data_dir={tmp}/empty"], "has no class folders"),
        ("vgg.py", [f"--data_dir={tmp}/emptyclass"], "has no images"),
        ("vgg.py", [f"--data_dir={tmp}/mismatch"], "train and test class folders differ"),
        ("vgg.py", [f"--data_dir={tmp}/corrupt"], "cannot read image"),
        ("vgg.py", [f"--data_dir={tmp}/truncated"], "test_batch' is corrupt"),
        ("resnet50.py", [f"--data_dir={tmp}/celeba_csv", "--pretrained=False"], "is malformed"),
        ("resnet50.py", [*celeba, "--target_attributes=Blonde_Hair"], "unknown CelebA attribute"),
        ("resnet50.py", [f"--data_dir={tmp}/empty", "--pretrained=False"], "CelebA not found"),
        ("evaluate_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_text"], "not a readable checkpoint"),
        ("evaluate_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_exploit"], "not a readable checkpoint"),
        ("selective_classification_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_arch"], "holds a ResNet50"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--batch_size=-1"], "batch sizes must be positive"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--num_epochs=0"], "must be positive"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--learning_rate=0"], "learning rates must be positive"),
        ("resnet50.py", [*celeba, "--batch_size=0"], "batch sizes must be positive"),
        ("selective_classification_vgg.py", ["--confidence_threshold=1.5"], "confidence_threshold must be in [0, 1]"),
        ("selective_classification_resnet.py", ["--confidence_threshold=-0.1"], "confidence_threshold must be in [0, 1]"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--attention_quantile=1.2"], "attention_quantile must be between"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--masking=gradcam"], "unknown masking strategy"),
        ("resnet50.py", [*celeba, "--masking=attention"], "unknown masking strategy"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--device=cuda:3"], "device 'cuda:3'"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--device=quantum"], "unknown device"),
        ("vgg.py", [f"--data_dir={cifar_dir}", f"--out_dir={tmp}/a_file/out"], "cannot create folder"),
    ]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, cifar_dir):
    return bad_inputs(str(tmp_path_factory.mktemp("bad")), cifar_dir)


def run_in_process(script: str, args: list, monkeypatch) -> None:
    """Run a script in this process (no interpreter start-up per row); its UserError propagates."""
    import runpy
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.mark.parametrize("row", range(24))  # the 24 rows of bad_inputs()
def test_bad_input_matrix(row, matrix, reference_run, monkeypatch, tmp_path):
    """Each row raises the UserError that the scripts print as one line (exit 1, see below), and the
    checkpoints already written stay byte for byte the same."""
    from config import UserError
    script, args, message = matrix[row]
    if not any(a.startswith("--checkpoint_dir") for a in args):
        args = [*args, f"--checkpoint_dir={reference_run}"]  # a mistake must not touch existing checkpoints
    if not any(a.startswith("--out_dir") for a in args):
        args = [*args, f"--out_dir={tmp_path}/out"]  # nothing written into the repository
    before = _digest(reference_run)
    with pytest.raises(UserError) as error:
        run_in_process(script, args, monkeypatch)
    assert message in str(error.value)
    assert _digest(reference_run) == before
    assert not os.path.exists("/tmp/masktune-pwned")


@pytest.mark.parametrize("row", [0, 5, 10, 21])
def test_user_errors_print_one_line_and_exit_1(row, matrix, reference_run, tmp_path):
    script, args, message = matrix[row]
    if not any(a.startswith("--checkpoint_dir") for a in args):
        args = [*args, f"--checkpoint_dir={reference_run}"]
    if not any(a.startswith("--out_dir") for a in args):
        args = [*args, f"--out_dir={tmp_path}/out"]
    result = run_script(script, *args, check=False)
    err = result.stderr.strip()
    assert result.returncode == 1 and err == f"error: {err[7:]}" and message in err
    assert "Traceback" not in err and "\n" not in err


def test_matrix_has_every_row(matrix):
    assert len(matrix) == 24
