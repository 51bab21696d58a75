"""The task's int8 TFLite front layers, run with LiteRT (or tflite_runtime as a fallback).

The model file is checked against the task's hash before it is handed to the interpreter: a
device runs only the feature extractor the manufacturer published and anchored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from crowdfl.errors import CrowdflError


class FrontModelError(CrowdflError):
    """The front model cannot be loaded or run."""


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        raise FrontModelError(
            "no_runtime",
            "neither ai_edge_litert nor tflite_runtime is installed; install one with "
            "'pip install ai-edge-litert' (preferred) or 'pip install tflite-runtime \"numpy<2\"'",
        ) from None


class FrontModel:
    """Batched int8 inference with float input and output (quantisation handled here)."""

    def __init__(self, model_bytes: bytes, expected_sha256: str, num_threads: int = 1) -> None:
        digest = hashlib.sha256(model_bytes).hexdigest()
        if digest != expected_sha256:
            raise FrontModelError("hash_mismatch", f"front model sha256 {digest[:16]}… is not the task's {expected_sha256[:16]}…")
        self.sha256 = digest
        try:
            self._interp = _interpreter_class()(model_content=model_bytes, num_threads=num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise FrontModelError("bad_model", str(exc)) from None
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self.input_shape = tuple(int(d) for d in self._in["shape"][1:])
        self.feature_dim = int(self._out["shape"][-1])
        self._batch = int(self._in["shape"][0])

    @classmethod
    def from_file(cls, path: Path, expected_sha256: str, num_threads: int = 1) -> FrontModel:
        return cls(Path(path).read_bytes(), expected_sha256, num_threads)

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [n, *self.input_shape])
            self._interp.allocate_tensors()
            self._in = self._interp.get_input_details()[0]
            self._out = self._interp.get_output_details()[0]
            self._batch = n

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        x = np.asarray(inputs, dtype=np.float32)
        if x.shape[1:] != self.input_shape:
            raise FrontModelError("bad_input", f"input shape {x.shape[1:]} is not the model's {self.input_shape}")
        if len(x) == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        self._resize(len(x))
        in_scale, in_zero = self._in["quantization"]
        if self._in["dtype"] == np.int8:
            x = np.clip(np.round(x / in_scale + in_zero), -128, 127).astype(np.int8)
        self._interp.set_tensor(self._in["index"], x)
        self._interp.invoke()
        y = self._interp.get_tensor(self._out["index"])
        out_scale, out_zero = self._out["quantization"]
        if self._out["dtype"] == np.int8:
            return ((y.astype(np.float32) - out_zero) * out_scale).astype(np.float32)
        return y.astype(np.float32)
