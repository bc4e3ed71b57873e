"""Errors raised by tvm-sparse; each message names the node, file or argument at fault."""


class TvmSparseError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ModelLoadError(TvmSparseError):
    """The file is missing or is not a readable ONNX model."""


class UnsupportedOpError(TvmSparseError):
    """An ONNX node (op type, opset, attribute or dtype) that tvm-sparse cannot compile."""

    def __init__(self, node: str, op_type: str, opset: int, detail: str = ""):
        self.node, self.op_type, self.opset = node, op_type, opset
        extra = f": {detail}" if detail else ""
        super().__init__(f"node '{node}' ({op_type}, opset {opset}) is not supported{extra}")


class ShapeError(TvmSparseError):
    """Input shapes are missing (dynamic dims) or do not match the model."""


class InputError(TvmSparseError):
    """Wrong input name, shape or dtype given to `run`."""


class ArtifactError(TvmSparseError):
    """A compiled output directory is missing, incomplete or corrupt."""
