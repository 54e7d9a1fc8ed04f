"""Run the whole VGG pipeline for several seeds and report every model's metrics as mean +/- std.

Differences of about one point are within seed noise on CIFAR-10, so compare MaskTune with its controls
over seeds. For each seed: vgg.py, evaluate_vgg.py and selective_classification_vgg.py, each in its own
folder (checkpoint_dir/seed<N>, out_dir/seed<N>); finished seeds are reused when skip_existing is on.

    python run_seeds.py                                         # seeds 0, 1, 2 with vgg.py's defaults
    python run_seeds.py --seeds=[0,1,2,3,4] --vgg_args="--masking=attention --data_dir=/data/cifar10-jpg"
    # the same ERM models, masked with another strategy:
    python run_seeds.py --vgg_args="--masking=attention" --erm_from=checkpoints/seeds --checkpoint_dir=checkpoints/seeds_att --out_dir=out/seeds_att

Writes out_dir/seeds.json and out_dir/seeds.md (a Markdown table).
"""
import json
import os
import shlex
import subprocess
import sys

from checkpoint import RUN_MODELS
from config import check, configure, ensure_writable_dir
from metrics import mean_std

seeds = [0, 1, 2]                      # one full pipeline per seed
checkpoint_dir = "checkpoints/seeds"   # each seed writes to checkpoint_dir/seed<N>
out_dir = "out/seeds"                  # each seed writes to out_dir/seed<N>; the summary goes here
vgg_args = ""                          # extra --name=value arguments for vgg.py (quoted, space separated)
skip_existing = True                   # reuse a seed whose evaluation already exists
selective = True                       # also run selective_classification_vgg.py for each seed
erm_from = ""                          # reuse the ERM models of another run_seeds checkpoint_dir (seed<N>/vgg_initial.pt)

config = configure(globals())
check(len(seeds) > 0, "seeds must not be empty")
ensure_writable_dir(out_dir)
here = os.path.dirname(os.path.abspath(__file__))


def run(script: str, *args: str) -> None:
    print(f"$ python {script} {' '.join(args)}", flush=True)
    code = subprocess.call([sys.executable, os.path.join(here, script), *args])
    check(code == 0, f"{script} failed (exit {code}); fix it and run again (finished seeds are kept)")


per_seed = []
for seed in seeds:
    ckpt, out = os.path.join(checkpoint_dir, f"seed{seed}"), os.path.join(out_dir, f"seed{seed}")
    metrics_file, selective_file = os.path.join(out, "evaluate", "metrics.json"), os.path.join(out, "selective", "selective.json")
    if not (skip_existing and os.path.exists(metrics_file) and (os.path.exists(selective_file) or not selective)):
        reuse = [f"--erm_checkpoint={os.path.join(erm_from, f'seed{seed}', 'vgg_initial.pt')}"] if erm_from else []
        run("vgg.py", f"--seed={seed}", f"--checkpoint_dir={ckpt}", f"--out_dir={os.path.join(out, 'vgg')}",
            *shlex.split(vgg_args), *reuse)
        run("evaluate_vgg.py", f"--checkpoint_dir={ckpt}", f"--out_dir={os.path.join(out, 'evaluate')}")
        if selective:
            run("selective_classification_vgg.py", f"--checkpoint_dir={ckpt}", f"--out_dir={os.path.join(out, 'selective')}")
    evaluation = json.load(open(metrics_file))
    scored = json.load(open(selective_file)) if selective else {"report_rule": {}, "scorers": []}
    row = {}
    for model, m in evaluation["models"].items():
        row[f"{model} | clean test accuracy"] = m["test_accuracy"]
        row[f"{model} | masked test accuracy"] = m["masked_test_accuracy"]
        for key, acc in m.get("spurious", {}).items():  # spurious patch: clean/aligned/conflicting/worst group
            row[f"{model} | {key.replace('_', ' ')}"] = acc
    for model, r in scored["report_rule"].items():
        row[f"report's rule, ERM + {model} | accuracy on accepted"] = r["accuracy_on_accepted"]
        row[f"report's rule, ERM + {model} | coverage"] = r["coverage"]
    for s in scored["scorers"]:
        row[f"{s['scorer']} | AURC"] = s["aurc"]
    per_seed.append(row)

keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
summary = {k: dict(zip(("mean", "std"), mean_std([r[k] for r in per_seed]))) for k in keys}
lines = [f"| metric (%, {len(seeds)} seeds: {', '.join(map(str, seeds))}) | mean +/- std |", "| --- | --- |"]
for k, v in summary.items():
    lines.append(f"| {k} | {100 * v['mean']:.2f} +/- {100 * v['std']:.2f} |")
print("\n".join(lines))
with open(os.path.join(out_dir, "seeds.json"), "w") as f:
    json.dump({"config": config, "per_seed": dict(zip(map(str, seeds), per_seed)), "summary": summary}, f, indent=1)
with open(os.path.join(out_dir, "seeds.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"wrote seeds.json and seeds.md to {out_dir}/; models: {', '.join(RUN_MODELS.values())}")
