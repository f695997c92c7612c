"""What ONNX Runtime executes for an exported file: integer (``QLinearConv``) or float convolutions.

ONNX Runtime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv``; in a YOLO graph SiLU sits
between the conv and the next ``QuantizeLinear``, so a Q/DQ file usually runs float convolutions on dequantized
tensors, slower than the FP model. Read from the graph ONNX Runtime builds after its own optimisation.

Examples:
    >>> from ultralytics_gabfusion.export.ort_kernels import ort_conv_kernels
    >>> ort_conv_kernels("best.onnx")  # doctest: +SKIP
    {'Conv': 75}
"""

from __future__ import annotations

import tempfile
from pathlib import Path

ORT_FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")
ORT_INT_CONVS = ("QLinearConv", "ConvInteger")


def ort_conv_kernels(onnx_file, threads: int = 1) -> dict[str, int]:
    """Convolution operators ONNX Runtime executes after its graph optimisation (``QLinearConv`` = integer).

    Args:
        onnx_file (str | Path): An ONNX file.
        threads (int): Intra-op threads of the session that optimises the graph.

    Returns:
        (dict[str, int]): ``{op type: count}`` of the convolution nodes of the optimised graph.
    """
    import onnx  # slow to import, and only needed here
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3  # the "hardware specific optimisations" warning of saving an optimised graph
        ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
        proto = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type in ORT_FLOAT_CONVS + ORT_INT_CONVS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["ORT_FLOAT_CONVS", "ORT_INT_CONVS", "ort_conv_kernels"]
