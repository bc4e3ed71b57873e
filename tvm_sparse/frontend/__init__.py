"""ONNX import: TVM's Relax importer plus, for our calls only, the converters it lacks."""

from .onnx import from_onnx, input_specs, load_model

__all__ = ["from_onnx", "input_specs", "load_model"]
