"""ONNX import: TVM's Relax ONNX importer extended, for our calls only, with the converters it lacks."""

from .onnx import from_onnx, input_specs, load_model

__all__ = ["from_onnx", "input_specs", "load_model"]
