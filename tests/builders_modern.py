"""Small transformer and modern CNN classifiers in torch, exported to ONNX for the engine tests.

Seeded random weights, no training. Exported with the TorchScript exporter
(`torch.onnx.export(..., dynamo=False)`), as a dynamic-batch graph or with a fixed batch of 1.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn.functional as F
from builders import IR_VERSION
from torch import nn


class _Block(nn.Module):
    """Pre-norm encoder block: attention by nn.MultiheadAttention or by hand with SDPA."""

    def __init__(self, dim: int, heads: int, *, sdpa: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.heads = heads
        self.sdpa = sdpa
        if sdpa:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
        else:
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.norm1(x)
        if self.sdpa:
            b, t, c = y.shape
            q, k, v = (
                self.qkv(y).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            )
            y = F.scaled_dot_product_attention(q, k, v)
            y = self.proj(y.transpose(1, 2).reshape(b, t, c))
        else:
            y = self.attn(y, y, y, need_weights=False)[0]
        x = x + y
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """32x32x3 -> 8x8 patches (16 tokens + CLS), 2 encoder blocks, head on CLS, 10 classes."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.1)
        self.blocks = nn.Sequential(_Block(dim, heads, sdpa=False), _Block(dim, heads, sdpa=True))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x)[:, 0])


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) * 0.5 + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)  # LayerNorm over channels, channels last
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """Patchify stem 4x4/4, two ConvNeXt blocks, a 2x2 downsample, global mean, LayerNorm, head."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.stem_norm = nn.GroupNorm(1, dim)  # LayerNorm over C, H, W as torch exports it
        self.stage1 = _ConvNeXtBlock(dim)
        self.down = nn.Conv2d(dim, 2 * dim, 2, stride=2)
        self.stage2 = _ConvNeXtBlock(2 * dim)
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(x))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class _SqueezeExcite(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, dim: int, expand: int, *, stride: int = 1, out: int | None = None):
        super().__init__()
        out = out or dim
        hidden = dim * expand
        self.residual = stride == 1 and out == dim
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.SiLU(),
            _SqueezeExcite(hidden, max(1, dim // 2)),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class TinyMobileNet(nn.Module):
    """EfficientNet/MobileNetV2 style: SiLU stem, MBConv blocks (ReLU6, depthwise, SE, linear
    bottleneck, inverted residual), Hardswish head conv, global pool, classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        )
        self.blocks = nn.Sequential(
            _InvertedResidual(8, 3),
            _InvertedResidual(8, 4, stride=2, out=12),
            _InvertedResidual(12, 4),
        )
        self.head = nn.Sequential(nn.Conv2d(12, 24, 1), nn.Hardswish())
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class NHWCNet(nn.Module):
    """An NHWC image (as a TensorFlow model takes it) transposed to NCHW first, then conv,
    GroupNorm, PReLU, a bilinear and a nearest upsample, Hardsigmoid gate, pooled head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.act = nn.PReLU(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        x = self.act(self.gn(self.conv1(x)))  # 16x16
        y = F.elu(self.conv2(x))  # 8x8
        up = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        near = F.interpolate(y, scale_factor=2, mode="nearest")
        x = torch.cat([x * F.hardsigmoid(up), near], dim=1)
        x = F.mish(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


class MaskedAttention(nn.Module):
    """SDPA as decoders call it: causal, with a boolean mask, with an additive mask and scale."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):  # [N, heads, tokens, dim]
        causal = F.scaled_dot_product_attention(x, x, x, is_causal=True)
        keep = torch.ones(6, 6, dtype=torch.bool).tril()
        masked = F.scaled_dot_product_attention(x, x, x, attn_mask=keep)
        biased = F.scaled_dot_product_attention(x, x, x, attn_mask=self.bias, scale=0.3)
        return causal + masked - biased


MODELS = {
    "vit": (TinyViT, (3, 32, 32), 17),
    "convnext": (TinyConvNeXt, (3, 32, 32), 18),
    "mobilenet": (TinyMobileNet, (3, 32, 32), 17),
    "nhwc": (NHWCNet, (32, 32, 3), 18),
}


def build(name: str, seed: int = 0) -> nn.Module:
    factory = MODELS[name][0]
    torch.manual_seed(seed)
    net = factory().eval()
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def export(net: nn.Module, sample_shape: tuple, *, opset: int, dynamic: bool) -> onnx.ModelProto:
    """The module as ONNX: input 'image' ([batch, ...] or [1, ...]), output 'logits'."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still shipped
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            torch.zeros(1, *sample_shape),
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = min(proto.ir_version, IR_VERSION)  # what onnxruntime 1.31 loads
    return proto
