"""Speed of this repository's MaskTune pipeline against the usual ways of doing the same work.

On the current device, with synthetic data of CIFAR-10 size, in images/s:
  (a) ERM training steps: this repo's path (uint8 tensor on the device, batched flips/crops, randperm)
      vs the pure model compute (forward + backward + step on a ready float batch) vs a torchvision
      Dataset + DataLoader + PIL transforms loop, same model and batch size; and streamed from host
      memory, a batch gathered one step ahead by a thread (what the scripts do past ``device_data_gb``);
  (b) masking: this repo's gradient, attention and XGradCAM masks (batched, thresholds on the device) vs
      pytorch-grad-cam's XGradCAM followed by a per-image numpy mean + 2 std threshold;
  (c) fine-tuning (training on the masked tensor) and (d) evaluation;
  and the same for ResNet50 at `resnet_image_size`; then the peak host (and CUDA) memory after each part.
This repo's path runs as the scripts do (``amp``, ``channels_last``); the references run the usual way, the
same model in fp32 and NCHW. ``--amp=False --channels_last=False`` leaves only the data path and the
algorithm to compare.

    python bench.py            # about a minute on 2 CPU cores
    python bench.py --dry_run=True    # seconds: a smoke test
    python bench.py --amp=False --channels_last=False   # this repo in fp32 NCHW too
"""

import time

import numpy as np
import torch
import torch.nn.functional as F

from masktune.batches import draw_epoch, flip_crop
from masktune.device import PeakMemory, autocast, native_bf16, pick_device, prepare_model, seed_everything
from masktune.engine import TrainingSet, predict, train_epoch
from masktune.masking import STRATEGIES, compute_masks, masked_images, other_class_partners
from masktune.recipes import configure
from models import ResNet50, VGGWithAttention

device = "auto"  # auto = cuda, then mps, then cpu
batch_size = 128  # training batch size (all paths)
eval_batch_size = 512  # evaluation and masking batch size
num_images = 4096  # synthetic images per measurement
resnet = True  # also measure ResNet50
resnet_image_size = 64  # ResNet50 input size (224 is the CelebA default; smaller fits a CPU)
resnet_images = 256  # synthetic images for ResNet50 measurements
resnet_batch_size = 32  # ResNet50 batch size for training, masking and evaluation (resnet50.py trains at 32)
reference = True  # also time the reference implementations
amp = True  # bf16 autocast where native (CUDA, CPUs with AVX512-BF16/AMX), as in the scripts
channels_last = True  # NHWC convolutions (CUDA and CPU), as in the scripts
dry_run = False  # tiny sizes: checks that everything runs, in seconds (no timing to quote)
seed = 0  # synthetic data and initialisation

config = configure(globals())
if dry_run:
    num_images, resnet_images, batch_size, eval_batch_size, resnet_image_size = 128, 8, 64, 128, 32
    resnet_batch_size = 8
device_ = pick_device(device)
generator = seed_everything(seed)
memory = PeakMemory(device_)  # peak host (and CUDA) memory after each part, printed at the end
cpu = torch.device("cpu")
speed = dict(channels_last=channels_last)


def sync() -> None:
    if device_.type == "cuda":
        torch.cuda.synchronize()
    elif device_.type == "mps":
        torch.mps.synchronize()


def images_per_second(fn, n: int) -> float:
    fn()  # warm-up (allocations, cudnn autotuning)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return n / (time.perf_counter() - start)


def pure_compute(model, x_float: torch.Tensor, labels: torch.Tensor, loss_fn, optimizer) -> None:
    """The floor: forward + backward + step on ready-made float batches already on the device."""
    for i in range(0, len(x_float), batch_size):
        with autocast(device_, amp):
            loss = loss_fn(model(x_float[i : i + batch_size])[0].float(), labels[i : i + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def dataloader_reference(model, images: torch.Tensor, labels: torch.Tensor, optimizer) -> None:
    """A conventional loop: PIL images, torchvision transforms, DataLoader (the model normalises)."""
    from PIL import Image
    from torchvision import transforms

    class PILDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.pil = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]
            self.transform = transforms.Compose(
                [
                    transforms.RandomCrop(images.shape[-1], padding=4, padding_mode="reflect"),
                    transforms.RandomHorizontalFlip(),
                    transforms.PILToTensor(),
                ]
            )

        def __len__(self):
            return len(self.pil)

        def __getitem__(self, i):
            return self.transform(self.pil[i]), labels[i]

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True)
    for x, y in loader:
        loss = F.cross_entropy(model(x.to(device_))[0], y.to(device_))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def gradcam_reference(model, images: torch.Tensor) -> None:
    """pytorch-grad-cam's XGradCAM (CPU numpy, per-image OpenCV resize), then per-image mean + 2 std masks."""
    from pytorch_grad_cam import XGradCAM

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    cam = XGradCAM(model=LogitsOnly(model), target_layers=[model.attention])
    for i in range(0, len(images), eval_batch_size):
        heatmaps = cam(input_tensor=images[i : i + eval_batch_size].to(device_).float(), targets=None)
        for h in heatmaps:
            positive = h[h > 0]
            threshold = positive.mean() + 2 * positive.std() if positive.size else np.inf
            _ = h > threshold


rows = []


def record(task: str, ours: float, baseline: float | None = None, baseline_name: str = "") -> None:
    rows.append((task, ours, baseline, baseline_name))
    ratio = f"{ours / baseline:6.2f}x {baseline_name} ({baseline:,.0f} img/s)" if baseline else ""
    print(f"{task:<44}{ours:>12,.0f} img/s   {ratio}", flush=True)


precision = "bf16 autocast" if amp and native_bf16(device_) else "fp32"
print(
    f"device {device_}, batch {batch_size}, {num_images} synthetic 32x32 images; this repo: {precision}, "
    f"{'channels_last' if channels_last else 'NCHW'}; references: fp32, NCHW"
)
images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8, generator=generator)
labels = torch.randint(0, 10, (num_images,), generator=generator)
images_d, labels_d = images.to(device_), labels.to(device_)
model = prepare_model(VGGWithAttention(10), device_, **speed)
plain_model = VGGWithAttention(10).to(device_)  # for the references: fp32, NCHW
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = TrainingSet(images_d, labels_d, F.cross_entropy, batch_size, amp=amp)

batches = draw_epoch(num_images, num_images, generator, True, images_d.device)  # augmented outside the timing
ready = flip_crop(images_d[batches[0].index], batches[0].flips, batches[0].shifts)
floor = images_per_second(
    lambda: pure_compute(model, ready, labels_d, F.cross_entropy, optimizer), num_images
)
record("VGG pure model compute (floor)", floor)
ours = images_per_second(lambda: train_epoch(model, optimizer, data, generator), num_images)
plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
baseline = (
    images_per_second(lambda: dataloader_reference(plain_model, images, labels, plain_optimizer), num_images)
    if reference
    else None
)
record("(a) VGG ERM training, this repo", ours, baseline, "DataLoader+PIL")
print(f"{'':<44}{100 * ours / floor:>11.0f}% of the pure model compute")
streamed = TrainingSet(images, labels_d, F.cross_entropy, batch_size, amp=amp, streamed=True)
record(
    "(a) VGG ERM training, streamed from host",  # what vgg.py does past device_data_gb
    images_per_second(lambda: train_epoch(model, optimizer, streamed, generator), num_images),
    ours,
    "in memory",
)
memory.record("VGG training")
for strategy in STRATEGIES:
    mask_rate = images_per_second(
        lambda s=strategy: compute_masks(model, images_d, s, batch_size=eval_batch_size, amp=amp), num_images
    )
    baseline = (
        images_per_second(lambda: gradcam_reference(plain_model, images), num_images)
        if reference and strategy == "xgradcam"
        else None
    )
    record(f"(b) VGG masking, {strategy}", mask_rate, baseline, "pytorch-grad-cam")
decisive = dict(extent="decisive", partners=other_class_partners(labels, generator), amp=amp)
for strategy in ("gradient", "integrated"):
    record(
        f"(b) VGG masking, {strategy}, decisive extent",
        images_per_second(
            lambda s=strategy: compute_masks(model, images_d, s, batch_size=eval_batch_size, **decisive),
            num_images,
        ),
    )
memory.record("VGG masking")
masks = compute_masks(model, images_d, "xgradcam", batch_size=eval_batch_size, amp=amp)
masked = TrainingSet(
    masked_images(images_d, masks, "shuffle_union", generator), labels_d, F.cross_entropy, batch_size, amp=amp
)
record(
    "(c) VGG fine-tuning, masks filled per batch",
    images_per_second(lambda: train_epoch(model, optimizer, masked, generator), num_images),
)
record(
    "(d) VGG evaluation",
    images_per_second(lambda: predict(model, images_d, batch_size=eval_batch_size, amp=amp), num_images),
)
memory.record("VGG fine-tuning and evaluation")

if resnet:
    size = resnet_image_size
    print(f"ResNet50, {resnet_images} synthetic {size}x{size} images, 10 attributes")
    r_images = torch.randint(
        0, 256, (resnet_images, 3, size, size), dtype=torch.uint8, generator=generator
    ).to(device_)
    r_labels = torch.randint(0, 2, (resnet_images, 10), generator=generator).float().to(device_)
    r_model = prepare_model(ResNet50(10), device_, **speed)
    r_optimizer = torch.optim.SGD(r_model.parameters(), lr=0.001, momentum=0.9)
    r_batch = resnet_batch_size
    r_loss = F.binary_cross_entropy_with_logits
    r_ours = images_per_second(
        lambda: train_epoch(
            r_model, r_optimizer, TrainingSet(r_images, r_labels, r_loss, r_batch, amp=amp), generator
        ),
        resnet_images,
    )
    record("(a) ResNet50 training", r_ours)
    r_streamed = TrainingSet(r_images.cpu(), r_labels, r_loss, r_batch, amp=amp, streamed=True)
    record(
        "(a) ResNet50 training, streamed from host",  # what resnet50.py does past device_data_gb
        images_per_second(lambda: train_epoch(r_model, r_optimizer, r_streamed, generator), resnet_images),
        r_ours,
        "in memory",
    )
    record(
        "(b) ResNet50 masking, xgradcam",
        images_per_second(
            lambda: compute_masks(
                r_model, r_images, "xgradcam", batch_size=r_batch, multilabel=True, amp=amp
            ),
            resnet_images,
        ),
    )
    record(
        "(d) ResNet50 evaluation",
        images_per_second(lambda: predict(r_model, r_images, batch_size=r_batch, amp=amp), resnet_images),
    )
    memory.record("ResNet50")
print(memory)
