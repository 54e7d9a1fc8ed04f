"""Run a VGG experiment for several seeds and report every model's metrics as mean +/- std.

An experiment is a recipe file plus overrides, given exactly as to vgg.py; for each seed this runs vgg.py,
evaluate_vgg.py and selective_classification_vgg.py with them, in checkpoint_dir/seed<N> and out_dir/seed<N>.
Finished seeds are reused when skip_existing is on.

    python run_seeds.py                                                # vgg.py's defaults, seeds 0, 1, 2
    python run_seeds.py config/cifar_square.py --data_dir=/data/cifar10-jpg
    python run_seeds.py config/cifar_square.py config/paper_protocol.py --erm_from=checkpoints/cifar_square

Writes out_dir/seeds.json and out_dir/seeds.md (a Markdown table).
"""

import json
import os
import sys

from masktune.checkpoint import RUN_MODELS, ensure_writable_dir
from masktune.console import check
from masktune.metrics import mean_std
from masktune.recipes import configure
from masktune.sweeps import Job, launch

seeds = [0, 1, 2]  # one full pipeline per seed
checkpoint_dir = "checkpoints/seeds"  # each seed writes to checkpoint_dir/seed<N>
out_dir = "out/seeds"  # each seed writes to out_dir/seed<N>; the summary goes here
skip_existing = True  # reuse a seed whose evaluation already exists
selective = True  # also run selective_classification_vgg.py for each seed
erm_from = ""  # reuse the ERM models of another run_seeds checkpoint_dir (vgg.py --erm_dir=<it>/seed<N>)
launcher = "local"  # "local" (seeds one after another), "parallel", "slurm", "submitit_local": sweeps.py
workers = 0  # parallel: seeds at once (0: one per visible GPU)
slurm_partition = ""  # slurm: the partition ("" for the cluster's default)
slurm_minutes = 240  # slurm, submitit_local: each seed's time limit

config, claims = configure(globals(), run_settings=True)
check(len(seeds) > 0, "seeds must not be empty")
ensure_writable_dir(out_dir)
# the experiment, passed on to every script: recipe files, and the flags that are not run_seeds.py's own
experiment = [a for a in sys.argv[1:] if not a.startswith("--") or a[2:].split("=")[0] in claims]
here = os.path.dirname(os.path.abspath(__file__))


def seed_folder(seed: int) -> str:
    return os.path.join(out_dir, f"seed{seed}")


def seed_job(seed: int) -> Job:
    """vgg.py, evaluate_vgg.py and selective_classification_vgg.py for one seed, in its own folders."""
    folders = [
        f"--seed={seed}",
        f"--checkpoint_dir={os.path.join(checkpoint_dir, f'seed{seed}')}",
        f"--out_dir={seed_folder(seed)}",
    ]
    reuse = [f"--erm_dir={os.path.join(erm_from, f'seed{seed}')}"] if erm_from else []
    scripts = {"vgg.py": reuse, "evaluate_vgg.py": []}
    scripts |= {"selective_classification_vgg.py": []} if selective else {}
    commands = [
        [sys.executable, os.path.join(here, s), *experiment, *folders, *more] for s, more in scripts.items()
    ]
    return Job(commands, log="" if launcher == "local" else os.path.join(seed_folder(seed), "run.log"))


def finished(seed: int) -> bool:
    done = ["metrics.json"] + ["selective.json"] * selective
    return skip_existing and all(os.path.exists(os.path.join(seed_folder(seed), f)) for f in done)


# every seed not finished yet, by the launcher; then the results are read from the files, however they ran
jobs = {seed: seed_job(seed) for seed in seeds if not finished(seed)}
slurm = {"timeout_min": slurm_minutes, "gpus_per_node": 1, "tasks_per_node": 1}
slurm |= {"slurm_partition": slurm_partition} if slurm_partition else {}
codes = launch(list(jobs.values()), launcher, workers, os.path.join(out_dir, "submitit"), slurm)
failed = [
    f"seed {s} (exit {c}{', see ' + j.log if j.log else ''})" for (s, j), c in zip(jobs.items(), codes) if c
]
check(not failed, f"failed: {', '.join(failed)}; fix it and run again (finished seeds are kept)")

per_seed = []
for seed in seeds:
    with open(os.path.join(seed_folder(seed), "metrics.json")) as f:
        evaluation = json.load(f)
    row = {
        f"{model} | {key.replace('_', ' ')}": value
        for model, m in evaluation["models"].items()
        for key, value in m.items()
        if key.endswith("accuracy") and isinstance(value, float)
    }
    if selective:
        with open(os.path.join(seed_folder(seed), "selective.json")) as f:
            scored = json.load(f)
        for model, r in scored["report_rule"].items():
            row[f"report's rule, ERM + {model} | accuracy on accepted"] = r["accuracy_on_accepted"]
            row[f"report's rule, ERM + {model} | coverage"] = r["coverage"]
        row.update({f"{s['scorer']} | AURC": s["aurc"] for s in scored["scorers"]})
    per_seed.append(row)

keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
summary = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in per_seed]))) for k in keys}
lines = [f"| metric (%, {len(seeds)} seeds: {', '.join(map(str, seeds))}) | mean +/- std |", "| --- | --- |"]
lines += [f"| {k} | {100 * v['mean']:.2f} +/- {100 * v['std']:.2f} |" for k, v in summary.items()]
print("\n".join(lines))
with open(os.path.join(out_dir, "seeds.json"), "w") as f:
    json.dump(
        {
            "config": config,
            "experiment": experiment,
            "per_seed": dict(zip(map(str, seeds), per_seed)),
            "summary": summary,
        },
        f,
        indent=1,
    )
with open(os.path.join(out_dir, "seeds.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"wrote seeds.json and seeds.md to {out_dir}/; models: {', '.join(RUN_MODELS.values())}")
