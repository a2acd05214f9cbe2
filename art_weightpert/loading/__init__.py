"""
Models from where users keep them: :func:`load_model` reads ``.pt2`` (``torch.export``), TorchScript, pickled
modules (after a warning), ``.onnx`` (through ``onnx2torch``, when installed) and ``package.module:callable``, and
returns an eager module that weight attacks and certificates can analyse; saved graphs (``.pt2``, TorchScript) are
rebuilt as ``torch.fx.GraphModule`` s of standard layers joined by residual additions, with the saved parameter names.
"""

from art_weightpert.loading.exported import exported_to_eager
from art_weightpert.loading.loader import LoadedModel, ModelSpecError, load_model, load_model_record
from art_weightpert.loading.rebuild import check_same_outputs
from art_weightpert.loading.torchscript import torchscript_to_eager
from art_weightpert.operators import UnsupportedModelError

__all__ = [
    "LoadedModel",
    "ModelSpecError",
    "UnsupportedModelError",
    "check_same_outputs",
    "exported_to_eager",
    "load_model",
    "load_model_record",
    "torchscript_to_eager",
]
