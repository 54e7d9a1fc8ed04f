"""ResNet50 on CelebA, Waterbirds and image folders: loading, the model, the scripts end to end, groups."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CELEBA_ATTRIBUTES, run_here, write_celeba, write_image_folder, write_waterbirds
from masktune.checkpoint import load_checkpoint
from masktune.console import UserError
from masktune.datasets import load_splits
from masktune.datasets.celeba import list_celeba
from models import AttentionMaskingResNet50, ResNet50

CELEBA = {
    "target_attributes": ["Blond_Hair", "Smiling"],
    "spurious_attribute": "Male",
    "image_size": 32,
    "subset_size": 0,
    "eval_subset_size": 0,
    "seed": 0,
}
TINY = [
    "--pretrained=False",
    "--image_size=32",
    "--num_epochs=1",
    "--batch_size=8",
    "--eval_batch_size=32",
    "--finetune_min_steps=0",
]


@pytest.mark.parametrize("layout", ["kaggle", "torchvision"])
def test_both_celeba_layouts_load_with_0_1_attributes(tmp_path, layout):
    root = write_celeba(str(tmp_path), layout)
    train, val, test = load_splits({**CELEBA, "data_dir": root})
    assert (len(train), len(val), len(test)) == (40, 10, 10)
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    assert set(train.labels.unique().tolist()) <= {0.0, 1.0}
    assert train.labels[:, 0].tolist() == [1.0, 0.0] * 20  # Blond_Hair: even images
    attrs = (
        open(
            os.path.join(root, "list_attr_celeba.csv")
            if layout == "kaggle"
            else os.path.join(root, "celeba", "list_attr_celeba.txt")
        )
        .read()
        .splitlines()
    )
    row = attrs[1 if layout == "kaggle" else 2].replace(",", " ").split()
    assert train.spurious[0].item() == (row[1 + CELEBA_ATTRIBUTES.index("Male")] == "1")
    subset = load_splits({**CELEBA, "data_dir": root, "subset_size": 12, "eval_subset_size": 4, "seed": 1})
    assert (len(subset[0]), len(subset[2])) == (12, 4)


def test_celeba_errors(tmp_path):
    with pytest.raises(UserError, match="CelebA not found"):
        list_celeba({**CELEBA, "data_dir": str(tmp_path)})
    write_celeba(str(tmp_path))
    with pytest.raises(UserError, match="unknown CelebA attribute.*Blonde_Hair"):
        list_celeba({**CELEBA, "data_dir": str(tmp_path), "target_attributes": ["Blonde_Hair"]})
    path = tmp_path / "list_attr_celeba.csv"
    path.write_text(path.read_text().replace(",1,", ",x,", 1))
    with pytest.raises(UserError, match="non-integer"):
        list_celeba({**CELEBA, "data_dir": str(tmp_path)})


def test_weight_transfer_keeps_the_erm_predictions():
    torch.manual_seed(0)
    resnet = ResNet50(10).eval()
    masking = AttentionMaskingResNet50.from_resnet(resnet).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.allclose(resnet(x)[0], masking(x)[0], atol=1e-5)
    assert torch.equal(masking.fc.bias, resnet.fc.bias)


@pytest.mark.slow
def test_resnet50_is_torchvisions_and_loads_its_imagenet_weights(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    reference = torchvision.models.resnet50().eval()
    torch.save(reference.state_dict(), tmp_path / "resnet50.pth")
    ours = ResNet50(1000, weights_path=str(tmp_path / "resnet50.pth")).eval()
    ours.fc.load_state_dict(reference.fc.state_dict())
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    expected = reference(ours.normalize(images))
    assert torch.allclose(ours(images)[0], expected, atol=1e-4)
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(UserError, match="cannot load the ImageNet ResNet50 weights"):
        ResNet50(2, weights_path=str(tmp_path / "bad.pth"))


def group_counts(path: str) -> dict:
    rows = list(csv.DictReader(open(path)))
    return {
        (r["label"], r["spurious"]): (
            sum(
                x["prediction_finetuned"] == x["label"]
                for x in rows
                if (x["label"], x["spurious"]) == (r["label"], r["spurious"])
            ),
            sum((x["label"], x["spurious"]) == (r["label"], r["spurious"]) for x in rows),
        )
        for r in rows
    }


@pytest.fixture(scope="module")
def waterbirds_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("waterbirds")
    data = write_waterbirds(str(root / "data"))
    args = [f"--data_dir={data}", f"--checkpoint_dir={root}/ckpt", f"--out_dir={root}/out", *TINY]
    return {"args": args, "out": f"{root}/out", "stdout": run_here("resnet50.py", *args)}


@pytest.mark.slow
def test_waterbirds_end_to_end_with_group_and_weighted_accuracies(waterbirds_run):
    assert (
        "no group labels" in waterbirds_run["stdout"] and "worst group accuracy" in waterbirds_run["stdout"]
    )
    metrics = json.load(open(os.path.join(waterbirds_run["out"], "metrics.json")))["models"]
    assert set(metrics) == {"ERM", "MaskTune", "no-mask control", "random-mask control"}
    tuned = metrics["MaskTune"]
    counts = group_counts(
        os.path.join(waterbirds_run["out"], "predictions.csv")
    )  # by hand, from the predictions
    accuracy = {g: c / n for g, (c, n) in counts.items()}
    assert tuned["worst_group_accuracy"] == pytest.approx(min(accuracy.values()))
    assert tuned["average_group_accuracy"] == pytest.approx(sum(accuracy.values()) / 4)
    training = {
        ("0", "0"): 12,
        ("0", "1"): 2,
        ("1", "0"): 2,
        ("1", "1"): 12,
    }  # write_waterbirds' training groups
    assert tuned["weighted_average_accuracy"] == pytest.approx(
        sum(training[g] * a for g, a in accuracy.items()) / 28
    )
    assert set(tuned["groups"]["per_group"]) == {
        "landbird, land",
        "landbird, water",
        "waterbird, land",
        "waterbird, water",
    }


@pytest.mark.slow
def test_selective_classification_on_waterbirds(waterbirds_run):
    run_here("selective_classification_resnet.py", *waterbirds_run["args"])
    result = json.load(open(os.path.join(waterbirds_run["out"], "selective.json")))
    scorers = {r["scorer"]: r for r in result["scorers"]}
    assert scorers["oracle (MaskTune predictions)"]["aurc"] <= scorers["SR MaskTune"]["aurc"] + 1e-9
    assert result["rules"]["MaskTune"]["coverage"] <= result["rules"]["MaskTune"]["agreement_rate"]


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    data = write_celeba(str(root / "data"))
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={root}/ckpt",
        f"--out_dir={root}/out",
        *TINY,
        '--target_attributes=["Blond_Hair","Smiling"]',
    ]
    return {
        "args": args,
        "data": data,
        "ckpt": f"{root}/ckpt",
        "out": f"{root}/out",
        "stdout": run_here("resnet50.py", *args),
    }


@pytest.mark.slow
def test_celeba_end_to_end_and_selective(celeba_run):
    for name in ("initial", "finetuned", "nomask", "randommask"):
        state = load_checkpoint(os.path.join(celeba_run["ckpt"], f"resnet50_{name}.pt"), "ResNet50", 2)
        assert state["config"]["target_attributes"] == ["Blond_Hair", "Smiling"]
    erm = json.load(open(os.path.join(celeba_run["out"], "metrics.json")))["models"]["ERM"]
    assert set(erm["per_attribute"]) == {"Blond_Hair", "Smiling"}
    assert all(
        0 <= m[k] <= 1
        for m in erm["per_attribute"].values()
        for k in ("accuracy", "precision", "recall", "f1")
    )
    groups = erm["groups"]["Blond_Hair"]
    assert all(g.startswith("Blond_Hair=") and ",Male=" in g for g in groups["per_group"])
    assert groups["worst_group_accuracy"] == min(groups["per_group"].values())
    rows = list(csv.DictReader(open(os.path.join(celeba_run["out"], "predictions.csv"))))
    assert (
        len(rows) == 10 and "probability_finetuned_Blond_Hair" in rows[0] and rows[0]["path"].endswith(".jpg")
    )
    run_here("selective_classification_resnet.py", *celeba_run["args"])
    rule = json.load(open(os.path.join(celeba_run["out"], "selective.json")))["rules"]["MaskTune"]
    assert rule["image_rule"]["coverage"] <= rule["image_rule"]["agreement_rate"]
    assert set(rule["attribute_rule"]["per_attribute"]) == {"Blond_Hair", "Smiling"}


@pytest.mark.slow
def test_resume_keeps_finished_work(celeba_run):
    before = {
        n: open(os.path.join(celeba_run["ckpt"], f"resnet50_{n}.pt"), "rb").read()
        for n in ("initial", "finetuned")
    }
    out = run_here("resnet50.py", *celeba_run["args"], "--resume=True")
    assert "ERM: done before, kept" in out and "fine-tune finetuned: done before, kept" in out
    assert all(
        open(os.path.join(celeba_run["ckpt"], f"resnet50_{n}.pt"), "rb").read() == b
        for n, b in before.items()
    )


@pytest.mark.slow
@pytest.mark.parametrize("with_val", [True, False])
def test_image_folder_end_to_end_with_and_without_val_and_a_group_csv(tmp_path, with_val):
    data = write_image_folder(str(tmp_path / "data"), classes=("cat", "dog"), per_class=12, per_class_test=4)
    if with_val:
        write_image_folder(
            str(tmp_path / "extra"), classes=("cat", "dog"), per_class=1, per_class_test=3, seed=1
        )
        os.rename(tmp_path / "extra" / "test", tmp_path / "data" / "val")
    _, val, test = load_splits({"data_dir": data, "seed": 0})
    listed = test.paths + (val.paths if with_val else [])
    (tmp_path / "groups.csv").write_text(
        "path,group\n"
        + "".join(f"{os.path.relpath(p, data)},{'g' + str(i % 2)}\n" for i, p in enumerate(listed))
    )
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        *TINY,
        f"--group_csv={tmp_path}/groups.csv",
        "--masking=attention",
        "--mask_fill=shuffle",
        "--controls=False",
    ]
    out = run_here("resnet50.py", *args)
    assert (
        "6 validation" if with_val else "2 validation"
    ) in out  # val/ as it is, or 10% of the training images
    tuned = json.load(open(tmp_path / "out" / "metrics.json"))["models"]["MaskTune"]
    assert set(tuned["groups"]["per_group"]) == {"cat, g0", "cat, g1", "dog, g0", "dog, g1"}
    assert "weighted_average_accuracy" not in tuned  # the training images' groups are unknown
    run_here("selective_classification_resnet.py", *args)
    assert os.path.getsize(tmp_path / "out" / "risk_coverage.png") > 1000


@pytest.mark.slow
def test_feature_masking_on_the_torchvision_celeba_layout(tmp_path):
    data = write_celeba(str(tmp_path / "data"), "torchvision")
    args = [
        f"--data_dir={data}",
        f"--checkpoint_dir={tmp_path}/ckpt",
        f"--out_dir={tmp_path}/out",
        *TINY,
        "--masking=feature",
        "--target_attributes=Blond_Hair",
        "--controls=False",
    ]
    run_here("resnet50.py", *args)
    state = load_checkpoint(str(tmp_path / "ckpt" / "resnet50_finetuned.pt"), "AttentionMaskingResNet50", 1)
    assert "mask_generator.weight" in state["model"]
    assert not os.path.exists(tmp_path / "ckpt" / "resnet50_randommask.pt")
    run_here("selective_classification_resnet.py", *args)


@pytest.mark.slow
def test_resnet_input_masks_cover_a_planted_feature_in_an_image_folder(tmp_path):
    """A ResNet50 trained briefly on an image folder where only a bright square (top left) tells "marked"
    from "plain": its XGradCAM masks fall on the square."""
    import torch.nn.functional as F

    from masktune.engine import TrainingSet, accuracy, predict, train_epoch
    from masktune.masking import compute_masks

    rng = np.random.default_rng(0)
    for name, marked in (("marked", True), ("plain", False)):
        for split, count in (("train", 24), ("test", 2)):
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                pixels = rng.integers(0, 80, size=(128, 128, 3), dtype=np.uint8)
                if marked:
                    pixels[16:64, 16:64] = 255
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    train, _, _ = load_splits({"data_dir": str(tmp_path), "seed": 0, "image_size": 128})
    torch.manual_seed(0)
    model = ResNet50(2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        data = TrainingSet(train.images, train.labels, F.cross_entropy, batch_size=16, augment=False)
        train_epoch(model, optimizer, data, torch.Generator().manual_seed(0))
    for layer in model.modules():  # a few steps leave BatchNorm's running statistics far off: recompute them
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    with torch.no_grad():
        model.train()(train.images)
    assert accuracy(predict(model, train.images, batch_size=64), train.labels) > 0.9
    marked = train.images[train.labels == train.classes.index("marked")]
    masks = compute_masks(model, marked, "xgradcam", batch_size=64)
    inside = masks[:, :64, :64].flatten(1).sum(1).float() / masks.flatten(1).sum(1).clamp_min(1)
    assert (masks.flatten(1).sum(1) > 0).all()
    assert (inside > 0.5).float().mean() > 0.8, inside


def test_decoded_images_cache_is_used_and_rebuilt_when_damaged(tmp_path, capsys):
    data = write_celeba(str(tmp_path / "data"))
    config = {**CELEBA, "data_dir": data, "cache_dir": str(tmp_path / "cache")}
    first = [s.images.clone() for s in load_splits(config)]
    files = sorted(os.listdir(tmp_path / "cache"))
    assert len(files) == 3  # train, val, test

    def replace_file(name, write):  # a new file in place of the cache (the old one may still be mapped)
        write(tmp_path / "new.npy")
        os.replace(tmp_path / "new.npy", tmp_path / "cache" / name)

    for name in files:  # a cached array is what is read back: decoding is skipped
        sevens = np.full_like(np.load(tmp_path / "cache" / name), 7)
        replace_file(name, lambda path, sevens=sevens: np.save(path, sevens))
    assert all(bool((s.images == 7).all()) for s in load_splits(config))
    replace_file(files[0], lambda path: open(path, "wb").write(b"damaged"))
    rebuilt = load_splits(config)
    assert "decoding again" in capsys.readouterr().out
    index = next(i for i, s in enumerate(rebuilt) if not bool((s.images == 7).all()))
    assert torch.equal(rebuilt[index].images, first[index])


@pytest.mark.slow
def test_resnet50_runs_a_planted_shortcut_benchmark_that_collect_results_prints(tmp_path):
    """resnet50.py with --shortcut: every model has the clean, aligned and conflicting accuracies of the test
    and validation images and their worst group, in the layout collect_results.py reads; CelebA's
    attributes are refused in one line."""
    data = write_image_folder(str(tmp_path / "data"), classes=("cat", "dog"), per_class=16, per_class_test=8)
    out = str(tmp_path / "out")
    args = [f"--data_dir={data}", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={out}", *TINY]
    # the fixed extent: masks on every image, even from a model this small
    run_here("resnet50.py", *args, "--shortcut=square", "--shortcut_size=8", "--mask_extent=fixed")
    written = json.load(open(os.path.join(out, "metrics.json")))
    models, coverage = written["models"], written["marker_coverage"]
    assert set(models) == {"ERM", "MaskTune", "no-mask control", "random-mask control"}
    assert (
        0 <= coverage["at_least_half"] <= 1 and 0 <= coverage["mean"] <= 1 and 0 < written["masked_fraction"]
    )
    for metrics in models.values():
        assert metrics["clean_accuracy"] == metrics["accuracy"]  # the test images as they are: unmarked
        for split in ("", "val_"):
            assert len(metrics[f"{split}groups"]["per_group"]) == 4  # (class, marker): 2 x 2
            for key in ("clean", "aligned", "conflicting", "worst_group"):
                assert 0 <= metrics[f"{split}{key}_accuracy"] <= 1
    printed = run_here("collect_results.py", out)
    assert "data, square 8, ratio 0.95, ResNet50" in printed and "| no-mask control" in printed
    masktune_row = next(line for line in printed.splitlines() if line.startswith("| MaskTune"))
    assert masktune_row.split(" | ")[-2] == f"{100 * coverage['mean']:.2f}"  # the "masks hide" column
    celeba = write_celeba(str(tmp_path / "celeba"))
    with pytest.raises(UserError, match="needs classes"):
        run_here("resnet50.py", *args[1:], f"--data_dir={celeba}", "--shortcut=square")
