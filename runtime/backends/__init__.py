"""Backends: what runs the graph (ONNX Runtime CPU/CUDA, OpenVINO, TensorRT) and which one runs here.

The public face; nothing outside this package imports its modules. The core (encoder) needs only
`select_backend`; bench and export also open single CPU variants, read the CPU's features and the
TensorRT engine-file rules from here.
"""

from .cpu_plan import CPU_ENGINES, CpuPlan, cpu_model, key_problem, plan_cpu, plan_for
from .isa import (
    AMX_FLAGS,
    BF16_FLAGS,
    ISA_FLAGS,
    VNNI_FLAGS,
    bf16_variant_problem,
    cpu_flags,
    cpu_summary,
    has_bf16,
    int8_variant_problem,
    int8_weight_type,
    read_cpuinfo,
    signed_int8_saturates,
)
from .onnxruntime_backend import CPU_DISABLED_OPTIMIZERS, import_onnxruntime, onnx_cpu_backend
from .openvino_backend import PRECISIONS as OPENVINO_PRECISIONS
from .openvino_backend import compile_config, import_openvino, openvino_available, openvino_version
from .protocol import Backend, BackendUnavailable
from .selection import DEVICES, brief_log, check_threads, open_cpu_backend, open_cpu_variant, select_backend
from .tensorrt_backend import TensorRTBackend, gpu_identity, require_tensorrt, tensorrt_version
from .tensorrt_engines import (
    ENGINES_DIR,
    Profile,
    TensorRTUnavailable,
    device_key,
    engine_file_name,
    engine_sidecars,
    rebuild_command,
    refusal_message,
    select_engine,
    sidecar_matches,
)

__all__ = [
    "AMX_FLAGS", "BF16_FLAGS", "CPU_DISABLED_OPTIMIZERS", "CPU_ENGINES", "DEVICES", "ENGINES_DIR", "ISA_FLAGS",
    "OPENVINO_PRECISIONS", "VNNI_FLAGS", "Backend", "BackendUnavailable", "CpuPlan", "Profile", "TensorRTBackend",
    "TensorRTUnavailable", "bf16_variant_problem", "brief_log", "check_threads", "compile_config", "cpu_flags",
    "cpu_model", "cpu_summary", "device_key", "engine_file_name", "engine_sidecars", "gpu_identity",
    "has_bf16", "import_onnxruntime", "import_openvino", "int8_variant_problem", "int8_weight_type", "key_problem",
    "onnx_cpu_backend", "open_cpu_backend", "open_cpu_variant", "openvino_available", "openvino_version",
    "plan_cpu", "plan_for", "read_cpuinfo", "rebuild_command", "refusal_message", "require_tensorrt",
    "select_backend", "select_engine", "sidecar_matches", "signed_int8_saturates", "tensorrt_version",
]
