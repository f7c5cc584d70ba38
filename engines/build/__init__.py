"""Build time: the ONNX export, FP8 quantization with ModelOpt, and the TensorRT build.

    export          condition.onnx + step.onnx + export.json for one ShapeProfile (one export, with
                    options: plain, or quantize.py's FP8 Q/DQ export)
    quantize        ModelOpt FP8 calibration on latents, then the FP8 export
    tensorrt_build  the two plans and manifest.json for one GPU class

Nothing at run time imports this package (engines/trt_support.py holds what the TensorRT runtime
shares with the builder), except the factory's on-demand export for the onnxruntime backend.

Public API (other folders use exactly these names):
    export_onnx, verify_export, ExportedGraphs, opset_for_tensorrt, quantize_fp8_and_export, CalibrationData,
    load_calibration_file, build_engines, EngineBuildError, validate_build_request
"""

from .export import ExportedGraphs, export_onnx, opset_for_tensorrt, verify_export
from .quantize import CalibrationData, load_calibration_file, quantize_fp8_and_export
from .tensorrt_build import EngineBuildError, build_engines, validate_build_request

__all__ = [
    "CalibrationData",
    "EngineBuildError",
    "ExportedGraphs",
    "build_engines",
    "export_onnx",
    "load_calibration_file",
    "opset_for_tensorrt",
    "quantize_fp8_and_export",
    "validate_build_request",
    "verify_export",
]
