"""Print the Markdown tables of RESULTS.md from the runs themselves: every table comes from here, none is
typed by hand (as BalancingGroups' parse.py and DomainBed's collect_results.py do).

Each argument is a folder that holds runs: run_seeds.py's out_dir (seed<N>/ folders) or one vgg.py run's
out_dir, after evaluate_vgg.py (metrics.json beside vgg.py's summary.json). Runs are grouped by benchmark
(the data set and planted shortcut in their config) and by method (their masking settings), so the same
folders give the same tables whichever order or launcher produced them; mean +/- std over seeds. Runs of
one method that differ in another setting (a fine-tune's length, a learning rate) get a row each, named
by that setting; a seed may be there once in each.

    python collect_results.py out/seeds/cifar_square out/seeds/cifar_square_published
    python collect_results.py out/seeds/*                # every benchmark, one table each
    python collect_results.py out/seeds/* --targets      # and each benchmark against the targets
    python collect_results.py out/seeds/* --headline     # only the README's table: one line per benchmark
    python collect_results.py runs/* --data_name=c:cifar10-jpg  # runs that read the data from a folder "c"
"""

import glob
import json
import os
import sys

from masktune.checkpoint import NOT_RUN_SETTINGS
from masktune.console import check, install_error_hook
from masktune.metrics import mean_std

MODELS = ("ERM", "MaskTune", "MaskTune, round 1", "no-mask control", "random-mask control")
SHIFTED = ("clean", "conflicting", "worst_group")  # a planted shortcut's columns, on val and test
# settings in which the seeds of one experiment may differ: where its data and models are, and whether
# the controls were trained beside MaskTune or its ERM models taken from another run
SAME_EXPERIMENT = (*NOT_RUN_SETTINGS, "seed", "data_dir", "device_data_gb", "erm_dir", "controls")


def benchmark(config: dict, data_names: dict) -> str:
    """The data set and planted shortcut of a run, in words (and the network, for resnet50.py's runs); the
    data is named by its folder, or by ``data_names[folder]``."""
    folder = os.path.basename(config["data_dir"].rstrip("/"))
    data = "MNIST" if config.get("dataset") == "mnist" else data_names.get(folder, folder)
    network = ", ResNet50" if "pretrained" in config else ""  # a setting of resnet50.py only
    if not config.get("shortcut"):
        return f"{data}, no shortcut{network}"
    marked = ", class 0 only" if config["shortcut_classes"] == "first" else ""
    shortcut = f"{config['shortcut']} {config['shortcut_size']}{marked}, ratio {config['shortcut_ratio']}"
    return f"{data}, {shortcut}{network}"


def method(config: dict) -> str:
    """The masking settings of a run, in words: MaskTune as published, or the settings that differ."""
    if (
        config["masking"] == "xgradcam"
        and config["mask_fill"] == "black"
        and config["finetune_min_steps"] == 0
    ):
        return "as published"
    if config["masking"] == "planted":
        return f"the planted marker as the mask, {config['mask_fill']}"
    extent = config.get("mask_extent", "fixed")
    size = (
        f", quantile {config['mask_quantile']}"
        if extent == "fixed" and config["masking"] != "xgradcam"
        else ""
    )
    grown = ", widened" if config.get("mask_widen") else ""
    grown += ", completed" if config.get("mask_complete") else ""
    grown += " first" if config.get("mask_complete") and config.get("mask_complete_first") else ""
    grown += f", shared {config['mask_class_share']}" if config.get("mask_class_share") else ""
    grown += f", consensus {config['mask_consensus']}" if config.get("mask_consensus") else ""
    reach = f" within {config['mask_round_reach']}" if config.get("mask_round_reach") else ""
    rounds = f", {config['mask_rounds']} rounds{reach}" if config.get("mask_rounds", 1) > 1 else ""
    return f"{config['masking']}, {extent}{size}{grown}{rounds}, {config['mask_fill']}"


def read_runs(folders: list[str], data_names: dict | None = None) -> list[dict]:
    """Every finished run below ``folders``: its config, machine, summary and per-model metrics;
    ``data_names`` as for ``benchmark``."""
    runs = []
    for folder in folders:
        paths = sorted(glob.glob(os.path.join(folder, "seed*", "metrics.json")))
        paths += (
            [os.path.join(folder, "metrics.json")]
            if os.path.isfile(os.path.join(folder, "metrics.json"))
            else []
        )
        check(paths, f"{folder!r} holds no metrics.json (run evaluate_vgg.py first)")
        for path in paths:
            with open(path) as f:
                metrics = json.load(f)
            summary_path = os.path.join(os.path.dirname(path), "summary.json")
            summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
            facts = metrics | summary  # resnet50.py writes its run's facts into metrics.json
            config = metrics["run_config"]
            runs.append(
                {
                    "benchmark": benchmark(config, data_names or {}),
                    "method": method(config),
                    "seed": config["seed"],
                    "machine": facts.get("machine", "?"),
                    "coverage": (facts.get("marker_coverage") or {}).get("mean"),
                    "masked": facts.get("masked_fraction"),
                    "models": metrics["models"],
                    "shortcut": bool(config.get("shortcut")),
                    "config": config,
                    "path": path,
                }
            )
    name_differences(runs)
    return runs


def name_differences(runs: list[dict]) -> None:
    """Add to each run's method the settings in which the runs of its benchmark and method disagree (of those
    every one of them records), so that different experiments are never averaged as seeds of one; a seed
    that is there twice (a run and its rerun) is an error, not two seeds."""
    for group in {(r["benchmark"], r["method"]) for r in runs}:
        mine = [r for r in runs if (r["benchmark"], r["method"]) == group]
        shared = set.intersection(*(set(r["config"]) for r in mine)) - set(SAME_EXPERIMENT)
        differing = sorted(k for k in shared if len({json.dumps(r["config"][k]) for r in mine}) > 1)
        for r in mine:
            r["method"] += "".join(f", {k}={r['config'][k]}" for k in differing)
    for group in {(r["benchmark"], r["method"]) for r in runs}:
        mine = [r for r in runs if (r["benchmark"], r["method"]) == group]
        for r in mine:
            twins = [t["path"] for t in mine if t["seed"] == r["seed"]]
            check(
                len(twins) == 1,
                f"seed {r['seed']} of {group[0]}, MaskTune {group[1]}, is there twice ({', '.join(twins)}): "
                "pass the folder of one run of each seed",
            )


def cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = mean_std([100 * v for v in values])
    return f"{mean:.2f} +/- {std:.2f}" if len(values) > 1 else f"{mean:.2f}"


def rows_of(runs: list[dict]) -> list[tuple[str, list[dict], str]]:
    """(row label, runs, model): ERM once (from the runs of the method with the most seeds: the others reuse
    its ERM models or train the same ones), then each method's MaskTune and the other models its runs
    trained (round 1 of mask_rounds > 1, the controls), each over the seeds that trained it."""
    methods = sorted({r["method"] for r in runs}, key=lambda m: (m != "as published", m))
    seeded = max(methods, key=lambda m: sum(r["method"] == m for r in runs))  # the first of the largest
    rows = [("ERM", [r for r in runs if r["method"] == seeded], "ERM")]
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        rows.append((f"MaskTune, {m}", mine, "MaskTune"))
        for model in MODELS[2:]:
            trained = [r for r in mine if model in r["models"]]
            if trained:
                rows.append((f"{model} ({m})", trained, model))
    return rows


def table(runs: list[dict]) -> str:
    """One benchmark: a row per model, mean +/- std over the seeds of each."""
    shortcut = runs[0]["shortcut"]
    if shortcut:
        columns = [f"{split}{c}" for split in ("val_", "") for c in SHIFTED]
        header = [
            "val clean",
            "val conflicting",
            "val worst group",
            "test clean",
            "test conflicting",
            "test worst group",
        ]
    else:
        columns, header = ["val_accuracy", "test_accuracy"], ["val", "test"]
    lines = [
        "| model | " + " | ".join(header) + " | masks hide | seeds |",
        "| --- | " + " | ".join("---" for _ in header) + " | --- | --- |",
    ]
    for label, mine, model in rows_of(runs):
        values = [
            [r["models"][model].get(f"{c}_accuracy", r["models"][model].get(c)) for r in mine]
            for c in columns
        ]
        if not shortcut:  # the validation accuracy of a run without groups is in vgg.py's summary
            values[0] = [r["models"][model].get("val_accuracy") for r in mine]
        covered = [r["coverage"] for r in mine if r["coverage"] is not None and model == "MaskTune"]
        seeds = ", ".join(str(r["seed"]) for r in sorted(mine, key=lambda r: r["seed"]))
        cells = [cell([v for v in vs if v is not None]) for vs in values]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {cell(covered) if covered else '–'} | {seeds} |"
        )
    machines = sorted({r["machine"] for r in runs})
    return "\n".join(lines) + f"\n\nMachine: {'; '.join(machines)}."


def mean_of(runs: list[dict], model: str, metric: str) -> float:
    return 100 * mean_std([r["models"][model][metric] for r in runs])[0]


def target_kind(name: str, shortcut: bool) -> str:
    """Which of the issue's targets a benchmark is held to, from its name: "plain" (no shortcut), "mnist"
    (the paper's biased MNIST), "scene", "whole_image" (no mask can remove it: the masks must do no harm) or
    "marker"."""
    if not shortcut:
        return "plain"
    if name.startswith("MNIST"):
        return "mnist"
    if " scene " in name:
        return "scene"
    if " grain " in name or " colour_cast " in name:
        return "whole_image"
    return "marker"


def target_rows(name: str, runs: list[dict]) -> list[str]:
    """The issue's targets for one benchmark, measured on the test split from each method's runs but MaskTune
    as published's (the method named where there are several): what was asked, what was measured, met or
    not."""
    methods = sorted({r["method"] for r in runs} - {"as published"})
    if len(methods) > 1:
        return [
            row
            for m in methods
            for row in target_rows(f"{name} ({m})", [r for r in runs if r["method"] == m])
        ]
    mine = [r for r in runs if r["method"] != "as published"]
    if not mine:
        return []
    rows = []

    def add(target: str, value: float, met: bool) -> None:
        rows.append(f"| {name} | {target} | {value:+.2f} | {'met' if met else '**missed**'} |")

    # against the no-mask control seed for seed: on the seeds that trained it, named if not all did
    paired = [r for r in mine if "no-mask control" in r["models"]]
    seeds = ", ".join(str(r["seed"]) for r in paired)
    on_seeds = "" if len(paired) == len(mine) else f" (seed{'s' if len(paired) > 1 else ''} {seeds})"

    def against_control(what: str, metric: str, margin: float) -> None:
        if paired:
            gap = mean_of(paired, "MaskTune", metric) - mean_of(paired, "no-mask control", metric)
            add(f"{what} - no-mask control's >= {margin:g}{on_seeds}", gap, gap >= margin)

    kind = target_kind(name, mine[0]["shortcut"])
    if kind == "plain":
        gap = mean_of(mine, "MaskTune", "test_accuracy") - mean_of(mine, "ERM", "test_accuracy")
        add("test - ERM's >= -0.5", gap, gap >= -0.5)
        return rows
    clean, conflicting = (mean_of(mine, "MaskTune", f"{c}_accuracy") for c in ("clean", "conflicting"))
    worst = mean_of(mine, "MaskTune", "worst_group_accuracy")
    if kind == "mnist":
        add("original (clean) >= 95", clean - 95, clean >= 95)
        add("biased (conflicting) >= 95", conflicting - 95, conflicting >= 95)
    elif kind == "scene":
        gap = conflicting - mean_of(mine, "ERM", "conflicting_accuracy")
        add("conflicting - ERM's >= 15", gap, gap >= 15)
        against_control("conflicting", "conflicting_accuracy", 5)
    elif kind == "whole_image":
        against_control("clean", "clean_accuracy", -1)
    else:
        add("clean - conflicting <= 3", clean - conflicting, clean - conflicting <= 3)
        gap = worst - mean_of(mine, "ERM", "worst_group_accuracy")
        add("worst group - ERM's >= 30", gap, gap >= 30)
        gap = clean - mean_of(mine, "ERM", "clean_accuracy")
        add("clean - ERM's >= -1", gap, gap >= -1)
    against_control("worst group", "worst_group_accuracy", 0)
    return rows


# the README's metric of each kind of target, and its label
HEADLINE_METRICS = {
    "plain": ("test_accuracy", "accuracy"),
    "mnist": ("conflicting_accuracy", "biased test"),
    "scene": ("conflicting_accuracy", "conflicting"),
    "whole_image": ("clean_accuracy", "clean"),
    "marker": ("worst_group_accuracy", "worst group"),
}


def model_cell(runs: list[dict], model: str, metric: str) -> str:
    """One model's metric over ``runs``, or "–" where some run did not train that model."""
    return (
        cell([r["models"][model][metric] for r in runs]) if all(model in r["models"] for r in runs) else "–"
    )


def headline(runs: list[dict]) -> str:
    """The README's table: per benchmark, the test metric of its targets for ERM, MaskTune as published
    (where it ran), the no-mask control and MaskTune with the defaults, and the defaults' seeds."""
    published_ran = any(r["method"] == "as published" for r in runs)
    columns = ["ERM", *(["MaskTune as published"] if published_ran else []), "no-mask control"]
    lines = [
        f"| benchmark (test, %) | {' | '.join(columns)} | MaskTune, defaults | seeds |",
        "| --- | " + " | ".join("---" for _ in columns) + " | --- | --- |",
    ]
    for name in sorted({r["benchmark"] for r in runs}):
        mine = [r for r in runs if r["benchmark"] == name]
        published = [r for r in mine if r["method"] == "as published"]
        defaults = [r for r in mine if r["method"] != "as published"]
        metric, label = HEADLINE_METRICS[target_kind(name, mine[0]["shortcut"])]
        cells = [model_cell(defaults or published, "ERM", metric)]
        cells += [model_cell(published, "MaskTune", metric)] if published_ran else []
        cells += [model_cell(defaults, "no-mask control", metric), model_cell(defaults, "MaskTune", metric)]
        cells.append(str(len(defaults)))
        lines.append(f"| {name}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selective_table(folders: list[str]) -> str:
    """selective_classification_vgg.py's results, where a run has them: the report's rule and every
    scorer's AURC (x 100, lower is better), mean +/- std over seeds."""
    files = [p for f in folders for p in sorted(glob.glob(os.path.join(f, "seed*", "selective.json")))]
    files += [
        os.path.join(f, "selective.json")
        for f in folders
        if os.path.isfile(os.path.join(f, "selective.json"))
    ]
    if not files:
        return ""
    results = [json.load(open(p)) for p in files]
    lines = ["| selective classification (test) | value | seeds |", "| --- | --- | --- |"]
    for model in results[0]["report_rule"]:
        for key in ("accuracy_on_accepted", "coverage"):
            values = [r["report_rule"][model][key] for r in results if model in r["report_rule"]]
            label = f"the report's rule, ERM + {model}: {key.replace('_', ' ')}"
            lines.append(f"| {label} | {cell(values)} | {len(values)} |")
    for row in results[0]["scorers"]:
        values = [s["aurc"] for r in results for s in r["scorers"] if s["scorer"] == row["scorer"]]
        lines.append(f"| {row['scorer']}: AURC x 100 | {cell(values)} | {len(values)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    install_error_hook()
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    targets = "--targets" in argv
    data_names = [a.split("=", 1)[1] for a in argv if a.startswith("--data_name=")]
    check(all(":" in n for n in data_names), "--data_name takes FOLDER:NAME, e.g. --data_name=c:cifar10-jpg")
    folders = [a for a in argv if a not in ("--targets", "--headline") and not a.startswith("--data_name=")]
    check(
        folders,
        "usage: python collect_results.py RUN_FOLDER [RUN_FOLDER ...] [--targets] [--headline] "
        "[--data_name=FOLDER:NAME ...]",
    )
    runs = read_runs(folders, dict(n.split(":", 1) for n in data_names))
    if "--headline" in argv:
        print(headline(runs))
        return
    names = sorted({r["benchmark"] for r in runs})
    for name in names:
        print(f"### {name}\n\n{table([r for r in runs if r['benchmark'] == name])}\n")
    selective = selective_table(folders)
    if selective:
        print(f"### Selective classification\n\n{selective}\n")
    if targets:
        print("| benchmark | target (test split, the defaults) | measured | |\n| --- | --- | --- | --- |")
        print(
            "\n".join(
                row
                for name in names
                for row in target_rows(name, [r for r in runs if r["benchmark"] == name])
            )
        )


if __name__ == "__main__":
    main(sys.argv[1:])
