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
import subprocess
import sys

from masktune.checkpoint import RUN_MODELS, ensure_writable_dir
from masktune.console import check
from masktune.metrics import mean_std
from masktune.recipes import configure

seeds = [0, 1, 2]  # one full pipeline per seed
checkpoint_dir = "checkpoints/seeds"  # each seed writes to checkpoint_dir/seed<N>
out_dir = "out/seeds"  # each seed writes to out_dir/seed<N>; the summary goes here
skip_existing = True  # reuse a seed whose evaluation already exists
selective = True  # also run selective_classification_vgg.py for each seed
erm_from = ""  # reuse the ERM models of another run_seeds checkpoint_dir (vgg.py --erm_dir=<it>/seed<N>)

config, claims = configure(globals(), run_settings=True)
check(len(seeds) > 0, "seeds must not be empty")
ensure_writable_dir(out_dir)
here = os.path.dirname(os.path.abspath(__file__))
# the experiment, passed on to every script: recipe files, and the flags that are not run_seeds.py's own
experiment = [a for a in sys.argv[1:] if not a.startswith("--") or a[2:].split("=")[0] in claims]


def run(script: str, *args: str) -> None:
    print(f"$ python {script} {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, os.path.join(here, script), *args])
    check(code == 0, f"{script} failed (exit {code}); fix it and run again (finished seeds are kept)")


per_seed = []
for seed in seeds:
    folders = [
        f"--seed={seed}",
        f"--checkpoint_dir={os.path.join(checkpoint_dir, f'seed{seed}')}",
        f"--out_dir={os.path.join(out_dir, f'seed{seed}')}",
    ]
    metrics_file = os.path.join(out_dir, f"seed{seed}", "metrics.json")
    selective_file = os.path.join(out_dir, f"seed{seed}", "selective.json")
    if not (
        skip_existing and os.path.exists(metrics_file) and (os.path.exists(selective_file) or not selective)
    ):
        reuse = [f"--erm_dir={os.path.join(erm_from, f'seed{seed}')}"] if erm_from else []
        run("vgg.py", *experiment, *folders, *reuse)
        run("evaluate_vgg.py", *experiment, *folders)
        if selective:
            run("selective_classification_vgg.py", *experiment, *folders)
    with open(metrics_file) as f:
        evaluation = json.load(f)
    row = {
        f"{model} | {key.replace('_', ' ')}": value
        for model, m in evaluation["models"].items()
        for key, value in m.items()
        if key.endswith("accuracy") and isinstance(value, float)
    }
    if selective:
        with open(selective_file) as f:
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
