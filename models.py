"""Models of the MaskTune report.

Every model's forward returns ``(logits, feature_map)``: the feature map is the output of the last
convolutional block, which the saliency code in ``masking.py`` explains (attention map or XGradCAM).
``features(x)`` and ``head(feature_map)`` split the forward there, so saliency needs no gradient through
the convolutional trunk.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class VGGWithAttention(nn.Module):
    """The report's reduced VGG for 32x32 images (section 3.1), layer for layer.

    The attention map is the ReLU'd conv6 output (128 x 8 x 8 for a 32 x 32 input). It passes through
    ``self.attention`` (an identity with no parameters) so that hook-based tools such as pytorch-grad-cam
    can target exactly that tensor; the state dict is the report's.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map: ReLU(conv6), (B, 128, H/4, W/4)."""
        x = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool(F.relu(self.conv4(F.relu(self.conv3(x)))))
        return self.attention(F.relu(self.conv6(F.relu(self.conv5(x)))))

    def head(self, attention_map: torch.Tensor) -> torch.Tensor:
        x = self.pool(attention_map).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention_map = self.features(x)
        return self.head(attention_map), attention_map


# Input normalisation the VGG was trained with (the report's: mean 0.5, std 0.5 per channel).
VGG_MEAN = (0.5, 0.5, 0.5)
VGG_STD = (0.5, 0.5, 0.5)


def _torchvision_resnet50(pretrained: bool, weights_path: str = "") -> nn.Module:
    """torchvision's ResNet50: ImageNet weights downloaded by torchvision, from a local file, or random."""
    import torchvision
    from config import UserError
    if weights_path:
        net = torchvision.models.resnet50()
        try:
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        except Exception as e:
            raise UserError(f"cannot load ResNet50 weights from {weights_path!r} ({type(e).__name__})") from None
        return net
    if not pretrained:
        return torchvision.models.resnet50()
    try:
        return torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
    except Exception as e:
        raise UserError(f"could not download the ImageNet ResNet50 weights ({type(e).__name__}); set "
                        "--pretrained=False, or --weights_path=resnet50-0676ba61.pth (torchvision's file)") from None


class ResNet50(nn.Module):
    """torchvision ResNet50 with a ``num_classes`` head; forward returns (logits, layer4 feature map)."""

    def __init__(self, num_classes: int, pretrained: bool = False, weights_path: str = ""):
        super().__init__()
        self.num_classes = num_classes
        net = _torchvision_resnet50(pretrained, weights_path)
        self.backbone = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2,
                                      net.layer3, net.layer4)
        self.fc = nn.Linear(net.fc.in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
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


# ImageNet normalisation, for the (pretrained) ResNet50.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
