"""CelebA / ResNet50: both on-disk layouts, attribute parsing, weight transfer, scripts end to end."""
import csv
import json
import os

import pytest
import torch

from checkpoint import load_checkpoint
from config import UserError
from conftest import CELEBA_ATTRIBUTES, run_script, write_celeba
from data import load_celeba
from models import AttentionMaskingResNet50, ResNet50


@pytest.mark.parametrize("layout", ["kaggle", "torchvision"])
def test_both_layouts_load_with_0_1_attributes(tmp_path, layout):
    root = write_celeba(str(tmp_path), layout)
    splits = load_celeba(str(tmp_path), ["Blond_Hair", "Smiling"], "Male", 32, 0, 0, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [40, 10, 10]
    train = splits["train"]
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8
    assert set(train.labels.unique().tolist()) <= {0.0, 1.0}
    assert train.labels[:, 0].tolist() == [1.0, 0.0] * 20  # Blond_Hair: even images
    attrs = open(os.path.join(root, "list_attr_celeba.csv") if layout == "kaggle" else
                 os.path.join(root, "celeba", "list_attr_celeba.txt")).read().splitlines()
    row = attrs[1 if layout == "kaggle" else 2].replace(",", " ").split()
    assert train.patch_class[0].item() == (row[1 + CELEBA_ATTRIBUTES.index("Male")] == "1")
    subset = load_celeba(str(tmp_path), ["Smiling"], "Male", 32, 12, 4, seed=1)
    assert (len(subset["train"]), len(subset["test"])) == (12, 4)


def test_celeba_errors(tmp_path):
    with pytest.raises(UserError, match="CelebA not found"):
        load_celeba(str(tmp_path), ["Smiling"], "Male", 32, 0, 0, 0)
    write_celeba(str(tmp_path))
    with pytest.raises(UserError, match="unknown CelebA attribute.*Blonde_Hair"):
        load_celeba(str(tmp_path), ["Blonde_Hair"], "Male", 32, 0, 0, 0)
    path = tmp_path / "list_attr_celeba.csv"
    path.write_text(path.read_text().replace(",1,", ",x,", 1))
    with pytest.raises(UserError, match="non-integer"):
        load_celeba(str(tmp_path), ["Smiling"], "Male", 32, 0, 0, 0)


def test_weight_transfer_keeps_the_erm_predictions():
    torch.manual_seed(0)
    resnet = ResNet50(10).eval()
    masking = AttentionMaskingResNet50.from_resnet(resnet).eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(resnet(x)[0], masking(x)[0], atol=1e-5)
    assert torch.equal(masking.fc.bias, resnet.fc.bias)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    data = write_celeba(str(root / "data"))
    ckpt, out = str(root / "ckpt"), str(root / "out")
    result = run_script("resnet50.py", f"--data_dir={data}", f"--checkpoint_dir={ckpt}", f"--out_dir={out}",
                        "--pretrained=False", "--image_size=32", "--num_epochs=1", "--batch_size=8",
                        "--eval_batch_size=32", "--target_attributes=[\"Blond_Hair\",\"Smiling\"]")
    return {"data": data, "ckpt": ckpt, "out": out, "stdout": result.stdout}


def test_resnet50_end_to_end(resnet_run):
    for name in ("initial", "finetuned", "nomask", "randommask"):
        state = load_checkpoint(os.path.join(resnet_run["ckpt"], f"resnet50_{name}.pt"), "ResNet50", 2)
        assert state["config"]["target_attributes"] == ["Blond_Hair", "Smiling"]
    metrics = json.load(open(os.path.join(resnet_run["out"], "metrics.json")))
    erm = metrics["models"]["ERM"]
    assert set(erm["per_attribute"]) == {"Blond_Hair", "Smiling"}
    for m in erm["per_attribute"].values():
        assert all(0 <= m[k] <= 1 for k in ("accuracy", "precision", "recall", "f1"))
    groups = erm["groups"]["Blond_Hair"]
    assert all(g.startswith("Blond_Hair=") and ",Male=" in g for g in groups["per_group"])
    assert groups["worst_group_accuracy"] == min(groups["per_group"].values())
    assert "Blond_Hair x Male worst-group accuracy" in resnet_run["stdout"]
    rows = list(csv.DictReader(open(os.path.join(resnet_run["out"], "predictions.csv"))))
    assert len(rows) == 10 and "probability_finetuned_Blond_Hair" in rows[0] and rows[0]["path"].endswith(".jpg")


def test_selective_classification_resnet(resnet_run):
    out = os.path.join(resnet_run["out"], "selective")
    run_script("selective_classification_resnet.py", f"--checkpoint_dir={resnet_run['ckpt']}", f"--out_dir={out}")
    result = json.load(open(os.path.join(out, "selective.json")))
    rule = result["rules"]["MaskTune"]
    assert rule["image_rule"]["coverage"] <= rule["image_rule"]["agreement_rate"]
    assert set(rule["attribute_rule"]["per_attribute"]) == {"Blond_Hair", "Smiling"}
    scorers = {r["scorer"]: r for r in result["scorers"]}
    assert scorers["oracle (MaskTune predictions)"]["aurc"] <= scorers["SR MaskTune"]["aurc"] + 1e-9
    assert os.path.getsize(os.path.join(out, "risk_coverage.png")) > 1000


def test_feature_masking_on_torchvision_layout(tmp_path):
    data = write_celeba(str(tmp_path / "data"), "torchvision")
    run_script("resnet50.py", f"--data_dir={data}", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/out",
               "--pretrained=False", "--image_size=32", "--num_epochs=1", "--batch_size=8", "--masking=feature",
               "--target_attributes=Blond_Hair")
    state = load_checkpoint(str(tmp_path / "ckpt" / "resnet50_finetuned.pt"), "AttentionMaskingResNet50", 1)
    assert "mask_generator.weight" in state["model"]
    assert not os.path.exists(tmp_path / "ckpt" / "resnet50_randommask.pt")
    run_script("selective_classification_resnet.py", f"--checkpoint_dir={tmp_path}/ckpt", f"--out_dir={tmp_path}/sel")


def test_resnet_input_masks_cover_the_planted_feature():
    """A ResNet50 trained briefly on images where only a bright square decides the label: its XGradCAM masks
    (multi-label evidence, mean + 2 std) fall on the square."""
    import torch.nn.functional as F
    from engine import accuracy, predict, train_epoch
    from masking import compute_masks
    from models import IMAGENET_MEAN, IMAGENET_STD
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(48) % 2).float().view(-1, 1)
    images = torch.randint(0, 80, (48, 3, 128, 128), generator=generator, dtype=torch.uint8)
    images[labels[:, 0] == 1, :, 16:64, 16:64] = 255  # the planted feature, top left
    torch.manual_seed(0)
    model = ResNet50(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        train_epoch(model, optimizer, images, labels, batch_size=16, device=torch.device("cpu"), generator=generator,
                    augment=False, loss_fn=F.binary_cross_entropy_with_logits, **norm)
    for layer in model.modules():  # a few steps leave BatchNorm's running statistics far off: recompute them
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None
    with torch.no_grad():
        model.train()(((images.float() / 255) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
                      / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    assert accuracy(predict(model, images, batch_size=64, device=torch.device("cpu"), **norm), labels) > 0.9
    masks = compute_masks(model, images[labels[:, 0] == 1], "xgradcam", batch_size=64, device=torch.device("cpu"),
                          multilabel=True, **norm)
    inside = masks[:, :64, :64].flatten(1).sum(1).float() / masks.flatten(1).sum(1).clamp_min(1)
    assert (masks.flatten(1).sum(1) > 0).all()
    assert (inside > 0.5).float().mean() > 0.8, inside


def test_resnet50_resume_keeps_finished_work(resnet_run):
    """Re-running a finished run with --resume trains nothing again and keeps every checkpoint."""
    before = {n: open(os.path.join(resnet_run["ckpt"], f"resnet50_{n}.pt"), "rb").read() for n in ("initial", "finetuned")}
    result = run_script("resnet50.py", f"--data_dir={resnet_run['data']}", f"--checkpoint_dir={resnet_run['ckpt']}",
                        f"--out_dir={resnet_run['out']}", "--pretrained=False", "--image_size=32", "--num_epochs=1",
                        "--batch_size=8", "--eval_batch_size=32", "--target_attributes=[\"Blond_Hair\",\"Smiling\"]",
                        "--resume=True")
    assert "resuming after ERM epoch 1" in result.stdout and "fine-tune finetuned: done before" in result.stdout
    assert all(open(os.path.join(resnet_run["ckpt"], f"resnet50_{n}.pt"), "rb").read() == b for n, b in before.items())


def test_decoded_images_cache_is_used_and_rebuilt_when_damaged(tmp_path, capsys):
    data = write_celeba(str(tmp_path / "data"))
    cache = tmp_path / "cache"
    first = load_celeba(data, ["Smiling"], "Male", 32, 0, 0, 0, workers=2, cache_dir=str(cache))
    files = sorted(os.listdir(cache))
    assert len(files) == 3  # train, val, test
    for name in files:  # a cached tensor is what is read back: decoding is skipped
        torch.save(torch.full_like(torch.load(cache / name), 7), cache / name)
    cached = load_celeba(data, ["Smiling"], "Male", 32, 0, 0, 0, cache_dir=str(cache))
    assert all(bool((cached[s].images == 7).all()) for s in cached)
    open(cache / files[0], "wb").write(b"damaged")
    rebuilt = load_celeba(data, ["Smiling"], "Male", 32, 0, 0, 0, cache_dir=str(cache))
    assert "decoding again" in capsys.readouterr().out
    split = next(s for s in rebuilt if not bool((rebuilt[s].images == 7).all()))
    assert torch.equal(rebuilt[split].images, first[split].images)
