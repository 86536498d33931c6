"""Models built from layers the way users write them (tests/test_user_layers.py)."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dSame(nn.Conv2d):
    """TensorFlow's SAME padding, computed in forward (as timm's Conv2dSame, EfficientNet-PyTorch's)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Weight standardisation in forward (BiT's, timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Head(nn.Module):
    def __init__(self, channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def same_padding(num_classes=10, in_channels=1, input_size=(16, 16)):
    return nn.Sequential(
        Conv2dSame(in_channels, 8, 3, stride=2),
        nn.ReLU(),
        Conv2dSame(8, 8, 5, stride=2),
        nn.ReLU(),
        Head(8, num_classes),
    )


def weight_standardised(num_classes=10, in_channels=1, input_size=(16, 16)):
    return nn.Sequential(
        StdConv2d(in_channels, 8, 3, padding=1), nn.ReLU(), StdConv2d(8, 8, 3, padding=1), Head(8, num_classes)
    )


class Twice(nn.Module):
    """One conv applied twice, and registered under two names."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.shared
        self.head = Head(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        return self.head(torch.relu(self.alias(x)))


def shared(num_classes=10, in_channels=1, input_size=(16, 16)):
    return Twice(num_classes, in_channels)


def conv_kinds(num_classes=10, in_channels=1, input_size=(16, 16)):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, padding_mode="circular"),
        nn.ReLU(),
        Head(8, num_classes),
    )


class Tokens(nn.Module):
    """A Linear on 3-D input (tokens)."""

    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, 8, 4, stride=4)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, tokens, 8)
        return self.head(torch.relu(self.mix(tokens)).mean(1))


def linear_3d(num_classes=10, in_channels=1, input_size=(16, 16)):
    return Tokens(num_classes, in_channels)


# -- models from PyPI zoos whose convolutions pad in their own forward ------------------------------
def timm_same_padding(num_classes=10, in_channels=3, input_size=(32, 32)):
    """timm's TF-ported MobileNetV3 (its stride-2 convolutions are timm's Conv2dSame)."""
    import timm

    return timm.create_model("tf_mobilenetv3_small_minimal_100", num_classes=num_classes, in_chans=in_channels)


def efficientnet_pytorch_b0(num_classes=10, in_channels=3, input_size=(32, 32)):
    """EfficientNet-PyTorch's B0: every convolution is its Conv2dStaticSamePadding."""
    from efficientnet_pytorch import EfficientNet

    return EfficientNet.from_name(
        "efficientnet-b0", num_classes=num_classes, in_channels=in_channels, image_size=list(input_size)
    )
