"""Import the reference implementations (open_clip, TorchMultimodal, torchvision) in tests.

The parity tests compare fmm against the reference code itself. open_clip and
TorchMultimodal import torchvision when they load, and torchvision's PyPI wheel is a CUDA
build: beside the CPU torch its compiled extension (`_C.so`) cannot load, and its import
then fails with "operator torchvision::nms does not exist" while registering fake kernels
for those ops. When that extension cannot load we declare the op *schemas* (no kernels)
so the import succeeds; calling one of these detection ops would still fail loudly. The
models the parity tests use (ViT, ResNet, transforms, stochastic depth) are pure Python.

Usage::

    from tests.reference import reference
    open_clip = reference("open_clip")
"""

import importlib
import importlib.util
import os
import warnings

import torch

# torchvision's detection ops, as its C++ extension declares them (csrc/ops/*.cpp).
_TORCHVISION_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width) -> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, "
    "float spatial_scale, SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
    "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
    "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
    "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
    "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_schema_library = None  # kept alive: dropping the Library object removes its ops


def _prepare_torchvision() -> None:
    global _schema_library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _schema_library is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    extension = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(extension)
    except (OSError, RuntimeError):
        _schema_library = torch.library.Library("torchvision", "DEF")
        for schema in _TORCHVISION_OP_SCHEMAS:
            _schema_library.define(schema)


def reference(module: str):
    """Import a reference module by dotted name, torchvision made importable first."""
    _prepare_torchvision()
    with warnings.catch_warnings():
        # "Failed to load image Python extension": image decoding is not used here.
        warnings.simplefilter("ignore", UserWarning)
        return importlib.import_module(module)
