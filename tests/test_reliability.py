"""Interrupted runs resume exactly; every user mistake is one clear line, exit 1, nothing written is lost."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import (
    ROOT,
    run_here,
    run_script,
    write_celeba,
    write_cifar_pickles,
    write_image_folder,
    write_waterbirds,
)
from masktune.checkpoint import load_checkpoint, save_checkpoint
from masktune.console import UserError
from models import ResNet50, VGGWithAttention

pytestmark = pytest.mark.slow
TINY = [
    "--num_epochs=2",
    "--batch_size=16",
    "--eval_batch_size=100",
    "--val_fraction=0.2",
    "--finetune_epochs=1",
    "--finetune_min_steps=0",
]
# a seeded run repeats bit for bit on the CPU; on CUDA, cuDNN's autotuned kernels need not (an H200 gave
# other final accuracies for the same run), so the exact-resume checks run on the CPU everywhere
ON_CPU = "--device=cpu"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cifar_dir):
    ckpt = str(tmp_path_factory.mktemp("reference"))
    run_script(
        "vgg.py",
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={ckpt}",
        f"--out_dir={ckpt}/out",
        *TINY,
        ON_CPU,
    )
    return ckpt


def interrupt_and_resume(script: str, args: list, prefix: str, folder, reference: str, sig: int) -> None:
    """Stop ``script`` with ``sig`` once its first ERM epoch is saved, resume it, and check that every final
    checkpoint equals the uninterrupted run's in ``reference`` bit for bit (in another process: a seeded
    CPU run is exactly repeatable)."""
    command = [
        sys.executable,
        os.path.join(ROOT, script),
        *args,
        f"--checkpoint_dir={folder}",
        f"--out_dir={folder}/out",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        # a job started in the background by a shell inherits SIGINT ignored, and Python then never turns
        # it into KeyboardInterrupt: give the run the default, as a terminal's Ctrl-C finds it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
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
    assert "ERM: resuming after epoch" in resumed.stdout
    assert_same_checkpoints(folder, reference, prefix)


def assert_same_checkpoints(folder, reference: str, prefix: str) -> None:
    """Every model of the run in ``folder`` has the weights and test accuracy of the one in ``reference``."""
    for name in ("initial", "last", "finetuned", "nomask", "randommask"):
        ours = load_checkpoint(os.path.join(folder, f"{prefix}_{name}.pt"))
        theirs = load_checkpoint(os.path.join(reference, f"{prefix}_{name}.pt"))
        assert ours["metrics"]["test_accuracy"] == theirs["metrics"]["test_accuracy"]
        for key, tensor in theirs["model"].items():
            assert torch.equal(ours["model"][key], tensor), (name, key)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_result(reference_run, cifar_dir, tmp_path, sig):
    """vgg.py killed (SIGKILL) or interrupted (Ctrl-C) during its ERM epochs, then resumed."""
    args = [f"--data_dir={cifar_dir}", *TINY, ON_CPU]
    interrupt_and_resume("vgg.py", args, "vgg", tmp_path, reference_run, sig)


def test_streaming_the_training_images_gives_the_run_held_in_memory(reference_run, cifar_dir, tmp_path):
    """A device budget of 0 keeps the training images in host memory, gathered a batch ahead by a thread:
    every checkpoint equals the in-memory run's, bit for bit (in another process, as that run was)."""
    out = run_script(
        "vgg.py",
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={tmp_path}",
        f"--out_dir={tmp_path}/out",
        *TINY,
        ON_CPU,
        "--device_data_gb=0",
    ).stdout
    assert "training images streamed from host memory" in out
    assert_same_checkpoints(tmp_path, reference_run, "vgg")


def test_resnet50_streamed_gives_the_metrics_held_in_memory(tmp_path):
    data = write_celeba(str(tmp_path / "data"), n=40)
    args = ["--pretrained=False", "--image_size=32", "--num_epochs=1", "--batch_size=8", ON_CPU]
    args += [f"--data_dir={data}", '--target_attributes=["Blond_Hair"]', "--finetune_min_steps=0"]
    args += ["--controls=False"]  # the controls fine-tune as MaskTune does: nothing more to compare
    metrics = {}
    for budget in ("-1", "0"):
        out = f"{tmp_path}/out{budget}"
        run_here(
            "resnet50.py", *args, f"--checkpoint_dir={out}", f"--out_dir={out}", f"--device_data_gb={budget}"
        )
        metrics[budget] = json.load(open(f"{out}/metrics.json"))["models"]
    assert metrics["0"] == metrics["-1"]


def test_resume_keeps_finished_work_and_refuses_another_config(reference_run, cifar_dir):
    before = {
        n: open(os.path.join(reference_run, f"vgg_{n}.pt"), "rb").read() for n in ("initial", "finetuned")
    }
    out = run_here(
        "vgg.py",
        f"--data_dir={cifar_dir}",
        f"--checkpoint_dir={reference_run}",
        f"--out_dir={reference_run}/out",
        *TINY,
        "--resume=True",
    )
    assert "ERM: done before, kept" in out and "fine-tune finetuned: done before, kept" in out
    assert all(open(os.path.join(reference_run, f"vgg_{n}.pt"), "rb").read() == b for n, b in before.items())
    with pytest.raises(UserError, match="cannot resume .*learning_rate=0.02"):
        run_here(
            "vgg.py",
            f"--data_dir={cifar_dir}",
            f"--checkpoint_dir={reference_run}",
            "--resume=True",
            *TINY,
            "--learning_rate=0.5",
            f"--out_dir={reference_run}/out",
        )


def _digest(folder: str) -> dict:
    return {
        f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(folder))
        if f.endswith(".pt")
    }


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/masktune-pwned",))


def bad_inputs(tmp: str, cifar_dir: str) -> list:
    """(script, arguments, expected message) for each row of the bad-input matrix."""
    os.makedirs(f"{tmp}/empty/train")
    os.makedirs(f"{tmp}/empty/test")
    os.makedirs(f"{tmp}/nothing")
    for name, edit in (
        ("wb_column", lambda t: t.replace("place,place_filename", "where,place_filename")),
        ("wb_split", lambda t: t.replace("bird_0001.jpg,0,0,0", "bird_0001.jpg,0,3,0")),
        ("wb_missing", lambda t: t.replace("bird_0002.jpg", "bird_9999.jpg")),
    ):
        write_waterbirds(f"{tmp}/{name}", per_group=(1, 1, 1, 1))
        text = edit(open(f"{tmp}/{name}/metadata.csv").read())
        open(f"{tmp}/{name}/metadata.csv", "w").write(text)
    write_image_folder(f"{tmp}/groups", per_class=2, per_class_test=1)
    open(f"{tmp}/groups.csv", "w").write("path,group\ntest/cat/0000.png,a\ntrain/cat/0000.png,b\n")
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

    for name in ("initial", "finetuned"):
        save_checkpoint(f"{tmp}/ckpt_arch/vgg_{name}.pt", ResNet50(10), None, {}, 1, {})
    open(f"{tmp}/a_file", "w").write("x")
    celeba = [f"--data_dir={tmp}/celeba", "--pretrained=False", "--image_size=32"]
    return [
        ("vgg.py", [f"--data_dir={tmp}/notest"], "notest/test' not found"),
        ("vgg.py", [f"--data_dir={tmp}/empty"], "has no class folders"),
        ("vgg.py", [f"--data_dir={tmp}/emptyclass"], "has no images"),
        ("vgg.py", [f"--data_dir={tmp}/mismatch"], "test and train class folders differ"),
        ("vgg.py", [f"--data_dir={tmp}/corrupt"], "cannot read image"),
        ("vgg.py", [f"--data_dir={tmp}/truncated"], "test_batch' is corrupt"),
        ("resnet50.py", [f"--data_dir={tmp}/celeba_csv", "--pretrained=False"], "is malformed"),
        ("resnet50.py", [*celeba, "--target_attributes=Blonde_Hair"], "unknown CelebA attribute"),
        ("resnet50.py", [f"--data_dir={tmp}/nothing", "--pretrained=False"], "no data set recognised"),
        (
            "resnet50.py",
            [f"--data_dir={tmp}/nothing", "--dataset=celeba", "--pretrained=False"],
            "CelebA not found",
        ),
        ("resnet50.py", [f"--data_dir={tmp}/wb_column", "--pretrained=False"], "lacks the column(s) place"),
        (
            "resnet50.py",
            [f"--data_dir={tmp}/wb_split", "--pretrained=False"],
            "split must be one of 0, 1, 2, got '3'",
        ),
        ("resnet50.py", [f"--data_dir={tmp}/wb_missing", "--pretrained=False"], "images that are not there"),
        ("resnet50.py", [f"--data_dir={tmp}/notest", "--pretrained=False"], "notest/test' not found"),
        (
            "resnet50.py",
            [f"--data_dir={tmp}/groups", f"--group_csv={tmp}/groups.csv", "--pretrained=False"],
            "names 1 files that are not validation or test images",
        ),
        ("vgg.py", [f"--data_dir={cifar_dir}", f"--erm_dir={tmp}/nothing"], "has no vgg_initial.pt"),
        ("evaluate_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_text"], "not a readable checkpoint"),
        ("evaluate_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_exploit"], "not a readable checkpoint"),
        ("selective_classification_vgg.py", [f"--checkpoint_dir={tmp}/ckpt_arch"], "holds a ResNet50"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--batch_size=-1"], "batch sizes must be positive"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--num_epochs=0"], "must be positive"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--learning_rate=0"], "learning rates must be positive"),
        ("resnet50.py", [*celeba, "--batch_size=0"], "batch sizes must be positive"),
        (
            "selective_classification_vgg.py",
            ["--confidence_threshold=1.5"],
            "confidence_threshold must be in [0, 1]",
        ),
        (
            "selective_classification_resnet.py",
            ["--confidence_threshold=-0.1"],
            "confidence_threshold must be in [0, 1]",
        ),
        (
            "vgg.py",
            [f"--data_dir={cifar_dir}", "--mask_quantile=1.2"],
            "mask_quantile must be between",
        ),
        ("resnet50.py", [*celeba, "--mask_quantile=0"], "mask_quantile must be between"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--mask_consensus=1.5"], "mask_consensus must be in [0, 1]"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--masking=gradcam"], "unknown masking 'gradcam'"),
        ("resnet50.py", [*celeba, "--masking=gradcam"], "unknown masking 'gradcam'"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--device=cuda:3"], "device 'cuda:3'"),
        ("vgg.py", [f"--data_dir={cifar_dir}", "--device=quantum"], "unknown device"),
        ("vgg.py", [f"--data_dir={cifar_dir}", f"--out_dir={tmp}/a_file/out"], "cannot create folder"),
    ]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, cifar_dir):
    return bad_inputs(str(tmp_path_factory.mktemp("bad")), cifar_dir)


@pytest.mark.parametrize("row", range(33))  # the 33 rows of bad_inputs()
def test_bad_input_matrix(row, matrix, reference_run, tmp_path):
    """Each row raises the UserError that the scripts print as one line (exit 1, see below), and the
    checkpoints already written stay byte for byte the same."""
    script, args, message = matrix[row]
    if not any(a.startswith("--checkpoint_dir") for a in args):
        args = [*args, f"--checkpoint_dir={reference_run}"]  # a mistake must not touch existing checkpoints
    if not any(a.startswith("--out_dir") for a in args):
        args = [*args, f"--out_dir={tmp_path}/out"]  # nothing written into the repository
    before = _digest(reference_run)
    with pytest.raises(UserError) as error:
        run_here(script, *args)
    assert message in str(error.value)
    assert _digest(reference_run) == before
    assert not os.path.exists("/tmp/masktune-pwned")


@pytest.mark.parametrize("row", [5, 12])  # a data error of vgg.py and one of resnet50.py
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
    assert len(matrix) == 33
