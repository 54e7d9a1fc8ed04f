"""Models of the MaskTune report.

Every model's forward returns ``(logits, feature_map)``: the feature map is the output of the last
convolutional block, which the saliency code in ``masking.py`` explains (attention map or XGradCAM).
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool(F.relu(self.conv4(F.relu(self.conv3(x)))))
        attention_map = self.attention(F.relu(self.conv6(F.relu(self.conv5(x)))))
        x = self.pool(attention_map).flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x), attention_map


# Input normalisation the VGG was trained with (the report's: mean 0.5, std 0.5 per channel).
VGG_MEAN = (0.5, 0.5, 0.5)
VGG_STD = (0.5, 0.5, 0.5)
