"""The networks: the report's VGGWithAttention, ResNet50, and the report's AttentionMaskingResNet50.

Every model takes uint8 images (N, 3, H, W) and normalises them itself (its mean and std are buffers that
are not saved in checkpoints). Its forward returns ``(logits, feature_map)``: the feature map is the output
of the last convolutional block, which the saliency code in ``masking.py`` explains (attention map or
XGradCAM). ``features(images)`` and ``head(feature_map)`` split the forward there, so saliency needs no
gradient through the convolutional trunk.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from masktune.console import UserError

RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # torchvision's IMAGENET1K_V1


class Normalized(nn.Module):
    """Input normalisation owned by the model: uint8 pixels -> [0, 1] -> per-channel standardised."""

    def __init__(self, mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - self.mean) / self.std


class VGGWithAttention(Normalized):
    """The report's reduced VGG for 32x32 images (section 3.1), layer for layer, inputs normalised with mean
    0.5 and std 0.5 as in the report.

    The attention map is the ReLU'd conv6 output (128 x 8 x 8 for a 32 x 32 input). It passes through
    ``self.attention`` (an identity with no parameters) so that hook-based tools such as pytorch-grad-cam
    can target exactly that tensor; the state dict is the report's.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv5 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv6 = nn.Conv2d(128, 128, 3, padding=1)
        self.attention = nn.Identity()
        self.fc1 = nn.Linear(128 * 4 * 4, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, num_classes)
        # He initialisation: with PyTorch's default init this 9-layer ReLU net without normalisation starts
        # with vanishing signals and sits at loss 2.303 for thousands of steps (the report's Table 1).
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        nn.init.normal_(self.fc3.weight, std=0.01)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The attention map: ReLU(conv6), (B, 128, H/4, W/4)."""
        x = self.normalize(images)
        x = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool(F.relu(self.conv4(F.relu(self.conv3(x)))))
        return self.attention(F.relu(self.conv6(F.relu(self.conv5(x)))))

    def head(self, attention_map: torch.Tensor) -> torch.Tensor:
        x = self.pool(attention_map).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_map = self.features(images)
        return self.head(attention_map), attention_map


class Bottleneck(nn.Module):
    """torchvision's ResNet50 block (stride on the 3x3 convolution), with its parameter names."""

    def __init__(self, inputs: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != 4 * width:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet50_trunk() -> nn.Sequential:
    """conv1, bn1, relu, maxpool, layer1-4 of torchvision's ResNet50, with its initialisation."""
    layers, inputs = [], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        layers.append(
            nn.Sequential(
                *[
                    Bottleneck(inputs if i == 0 else 4 * width, width, stride if i == 0 else 1)
                    for i in range(blocks)
                ]
            )
        )
        inputs = 4 * width
    trunk = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
        *layers,
    )
    for layer in trunk.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return trunk


def imagenet_weights(weights_path: str) -> dict:
    """torchvision's ImageNet ResNet50 weights, from ``weights_path`` or downloaded, renamed for the trunk."""
    try:
        if weights_path:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(RESNET50_URL, map_location="cpu", progress=False)
    except Exception as e:
        where = f"from {weights_path!r}" if weights_path else f"from {RESNET50_URL}"
        raise UserError(
            f"cannot load the ImageNet ResNet50 weights {where} ({type(e).__name__}); set "
            "--pretrained=False, or --weights_path=resnet50-0676ba61.pth (torchvision's file)"
        ) from None
    names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {
        names[k.split(".")[0]] + k[k.index(".") :]: v for k, v in state.items() if not k.startswith("fc.")
    }


class ResNet50(Normalized):
    """ResNet50 with a ``num_classes`` head and ImageNet-normalised inputs; returns (logits, layer4 map)."""

    def __init__(self, num_classes: int, pretrained: bool = False, weights_path: str = ""):
        super().__init__(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        self.num_classes = num_classes
        self.backbone = resnet50_trunk()
        if pretrained or weights_path:
            try:
                self.backbone.load_state_dict(imagenet_weights(weights_path))
            except RuntimeError:
                raise UserError(f"{weights_path or RESNET50_URL!r} does not hold ResNet50 weights") from None
        self.fc = nn.Linear(2048, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(images))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        return self.head(features), features


class AttentionMaskingResNet50(ResNet50):
    """The report's fine-tuning model: a mask generator (1x1 conv over the 2048 feature channels, sigmoid)
    multiplies the feature map before pooling.

    ``from_resnet`` copies backbone AND classifier (the report's code dropped the trained classifier). The
    generator starts at zero, so the mask is 0.5 everywhere, and the copied classifier weights are doubled
    to compensate: fine-tuning starts exactly from the ERM model's predictions, and the sigmoid starts where
    its gradient is largest (a mask saturated near 1 would hardly learn).
    """

    def __init__(self, num_classes: int):
        super().__init__(num_classes)
        self.mask_generator = nn.Conv2d(2048, 1, kernel_size=1)
        nn.init.zeros_(self.mask_generator.weight)
        nn.init.zeros_(self.mask_generator.bias)

    @classmethod
    def from_resnet(cls, resnet: ResNet50) -> "AttentionMaskingResNet50":
        model = cls(resnet.num_classes).to(next(resnet.parameters()).device)
        model.backbone.load_state_dict(resnet.backbone.state_dict())
        model.fc.load_state_dict(resnet.fc.state_dict())
        with torch.no_grad():
            model.fc.weight.mul_(2.0)  # the initial mask halves the features
        return model

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc((features * torch.sigmoid(self.mask_generator(features))).mean((2, 3)))
