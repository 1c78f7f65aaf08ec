"""Run ONNX models with onnxruntime alone (no torch), so a model is judged as it is deployed."""

from .latency import latency, latency_pair
from .metrics import ValidationReport, validate
from .sessions import PROVIDERS, cuda_problem, predict, run_batches, session, tensor_summaries

__all__ = [
    "PROVIDERS",
    "ValidationReport",
    "cuda_problem",
    "latency",
    "latency_pair",
    "predict",
    "run_batches",
    "session",
    "tensor_summaries",
    "validate",
]
