"""Running a sweep's jobs: one after another, several at once on one machine, or on a Slurm cluster.

A job is a list of commands (argument lists) run in order, stopping at the first that fails. Launchers:
  local           one job after another, printing to this terminal
  parallel        ``workers`` jobs at once (0: one per visible GPU), each given one GPU through
                  CUDA_VISIBLE_DEVICES (shared round robin when there are more workers than GPUs), each
                  job's output in its log file
  slurm           each job submitted to Slurm through submitit (``pip install submitit``), one GPU each
  submitit_local  submitit's local executor: the Slurm path run on this machine (what the tests use)
Whichever ran them, the jobs write the same files, so the results are collected the same way.
"""

import contextlib
import os
import queue
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from masktune.console import check, check_choice

LAUNCHERS = ("local", "parallel", "slurm", "submitit_local")


@dataclass
class Job:
    commands: list[list[str]]
    log: str = ""  # where the output goes ("" for the terminal)
    env: dict = field(default_factory=dict)  # added to the environment


def run_job(job: Job) -> int:
    """Run the job's commands in order; the exit status of the first that fails, else 0."""
    env = {**os.environ, **job.env}
    if job.log:
        os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
    with open(job.log, "a") if job.log else contextlib.nullcontext() as log:  # None: this terminal
        for command in job.commands:
            print(f"$ {' '.join(command)}", file=log, flush=True)
            code = subprocess.call(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
            if code != 0:
                return code
    return 0


def gpu_of_slot(slot: int) -> dict:
    """The environment that gives worker ``slot`` one of the GPUs this process sees, round robin: with more
    workers than GPUs they share them (a slot past the last GPU would otherwise see none and train on the
    CPU). Empty where no GPU is visible."""
    count = torch.cuda.device_count()
    if count == 0:
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [i for i in visible.split(",") if i][:count] if visible else [str(i) for i in range(count)]
    return {"CUDA_VISIBLE_DEVICES": ids[slot % len(ids)]}


def _run_on_a_free_slot(job: Job, slots: queue.Queue) -> int:
    slot = slots.get()  # a worker's number: no two jobs hold one at once
    try:
        return run_job(Job(job.commands, job.log, {**job.env, **gpu_of_slot(slot)}))
    finally:
        slots.put(slot)


def submitit_executor(launcher: str, folder: str, slurm: dict):
    """submitit's Slurm (``AutoExecutor``) or local executor, its files and logs in ``folder``."""
    try:
        import submitit
    except ImportError:
        check(False, f"launcher={launcher} needs submitit: pip install submitit")
    # the jobs unpickle run_job: the package must be importable wherever they run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    if launcher == "submitit_local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=slurm.get("timeout_min", 60))
        return executor
    executor = submitit.AutoExecutor(folder=folder)
    executor.update_parameters(**slurm)
    return executor


def launch(jobs: list[Job], launcher: str, workers: int = 0, folder: str = "", slurm: dict | None = None):
    """Run ``jobs`` with ``launcher`` (see the module docstring) and wait for all of them: their exit
    statuses, in order. ``folder``: submitit's files; ``slurm``: submitit's Slurm parameters."""
    check_choice("launcher", launcher, LAUNCHERS)
    if launcher == "local":  # stops at the first failure: the jobs after it would most likely fail alike
        codes = []
        for job in jobs:
            codes.append(run_job(job))
            if codes[-1]:
                break
        return codes
    if launcher == "parallel":
        count = workers or torch.cuda.device_count()
        check(
            count > 0,
            "launcher=parallel with workers=0 runs one job per GPU, and none is visible: set workers",
        )
        slots = queue.Queue()
        for slot in range(count):
            slots.put(slot)
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda job: _run_on_a_free_slot(job, slots), jobs))
    executor = submitit_executor(launcher, folder, slurm or {})
    submitted = [executor.submit(run_job, job) for job in jobs]
    return [job.result() for job in submitted]
