"""The real-size tier's architectures, written out by hand (no torchvision here).

All take (N, 3, 32, 32) images and return 10 logits (the ConvNeXt did not train on the digit
scenes in 12 epochs, SGD or Adam one-cycle, and is kept for the cost table only); `width` scales the channels where the
family allows (the PreAct-ResNet-18 keeps BackdoorBench's full width: 64-128-256-512).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the skip (a 1x1 conv on the activated input when
    the shape changes), as in He et al.'s pre-activation ResNet."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 (BackdoorBench's CIFAR model): conv3x3 stem, four stages of two
    pre-activation blocks (64, 128, 256, 512 channels), BN-ReLU, global average pool, fc."""

    def __init__(self, width: int = 64):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        blocks, c_in = [], width
        for i, c in enumerate(widths):
            for j in range(2):
                blocks.append(PreActBlock(c_in, c, stride=2 if i > 0 and j == 0 else 1))
                c_in = c
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def preact_resnet18(width: int) -> nn.Module:
    """PreAct-ResNet-18, 11.2M parameters at width 64 (BackdoorBench's)."""
    return PreActResNet18(width)


def vgg(width: int) -> nn.Module:
    """VGG-style: [w, M, 2w, M, 4w, 4w, M, 8w, 8w, M] conv3x3-BN-ReLU, then fc(8w*4 -> 8w)-ReLU-fc."""
    cfg = [width, "M", 2 * width, "M", 4 * width, 4 * width, "M", 8 * width, 8 * width, "M"]
    layers: list[nn.Module] = []
    c_in = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            c_in = v
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(c_in * 4, c_in), nn.ReLU(), nn.Linear(c_in, NUM_CLASSES)
    )


class SqueezeExcite(nn.Module):
    """EfficientNet's channel gate: pool, 1x1 conv down-SiLU-1x1 conv up-sigmoid, scale."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.down = nn.Conv2d(c, squeeze, 1)
        self.up = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.up(F.silu(self.down(F.adaptive_avg_pool2d(x, 1)))))
        return x * g


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand-BN-act, 3x3 depthwise-BN-act, 1x1 project-BN, with the
    identity added when the shape is kept; act ReLU6, or SiLU with a squeeze-excite gate after
    the depthwise conv (EfficientNet's MBConv)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, act=nn.ReLU6, se: bool = False):
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
        ]
        if se:
            layers.append(SqueezeExcite(hidden, max(1, c_in // 4)))
        layers += [nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


def mobilenet_v2(width: int, act=nn.ReLU6, se: bool = False) -> nn.Module:
    """MobileNetV2-style for 32x32 (CIFAR stride plan): stem conv3x3(3 -> w)-BN-ReLU6, inverted
    residuals (expansion t, channels c, repeats n, first stride s) (1,w,1,1) (6,1.5w,2,1)
    (6,2w,2,2) (6,4w,2,2) (6,6w,1,1) (6,10w,1,2), 1x1 conv to 40w-BN-ReLU6, pool, fc."""
    plan = [(1, width, 1, 1), (6, 3 * width // 2, 2, 1), (6, 2 * width, 2, 2), (6, 4 * width, 2, 2),
            (6, 6 * width, 1, 1), (6, 10 * width, 1, 2)]  # fmt: skip
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act()
    ]
    c_in = width
    for t, c, n, s in plan:
        for i in range(n):
            layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t, act, se))
            c_in = c
    head = 40 * width
    layers += [
        nn.Conv2d(c_in, head, 1, bias=False), nn.BatchNorm2d(head), act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(head, NUM_CLASSES),
    ]  # fmt: skip
    return nn.Sequential(*layers)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise conv7x7, LayerNorm over channels (channels last), Linear to
    4x, GELU (erf form), Linear back, the residual added."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.pw2(self.act(self.pw1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """A small ConvNeXt for 32x32: patchify stem conv2x2 (stride 2) + LayerNorm, stages of
    (w, 2w, 4w) channels with (2, 2, 2) blocks, LayerNorm + conv2x2 stride 2 between stages,
    global average pool, LayerNorm, fc."""

    def __init__(self, width: int, depths: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        dims = [width * 2**i for i in range(len(depths))]
        self.stem = nn.Conv2d(3, dims[0], 2, stride=2)
        self.stem_norm = nn.LayerNorm(dims[0])
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            self.stages.append(nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                self.downs.append(nn.ModuleList([nn.LayerNorm(dim), nn.Conv2d(dim, dims[i + 1], 2, stride=2)]))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], NUM_CLASSES)

    @staticmethod
    def _channel_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._channel_norm(self.stem_norm, self.stem(x))
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.downs):
                norm, conv = self.downs[i]
                x = conv(self._channel_norm(norm, x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


def efficientnet(width: int) -> nn.Module:
    """EfficientNet-style: the MobileNetV2 plan with SiLU and a squeeze-excite gate in every
    block (EfficientNet-B0's MBConv, without its compound scaling)."""
    return mobilenet_v2(width, act=nn.SiLU, se=True)


def convnext(width: int) -> nn.Module:
    """A small ConvNeXt (GELU, LayerNorm, depthwise 7x7), three stages of two blocks."""
    return ConvNeXt(width)


ARCHITECTURES = {
    "preact-resnet18": preact_resnet18,
    "vgg-bn": vgg,
    "mobilenetv2": mobilenet_v2,
    "efficientnet": efficientnet,
    "convnext": convnext,
}
