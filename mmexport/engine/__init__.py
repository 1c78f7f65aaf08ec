"""ONNX graphs executed in PyTorch, with a bound hook at every clipping site."""

from .executor import SUPPORTED_OPS, ChannelScale, Engine, unsupported_ops

__all__ = ["ChannelScale", "Engine", "SUPPORTED_OPS", "unsupported_ops"]
