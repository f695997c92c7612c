"""Benchmarks: ``yolo-gab bench`` (paper table: accuracy), ``bench speed`` (step cost), ``bench deploy`` (exported files).

``yolo-gab bench [accuracy] key=value ...`` trains the FP model once per model and seed, then QAT arms (baseline,
+GABFusion, +GABFusion+ADA) per method and bit-width from that same checkpoint with identical schedules and seeds,
re-validates every ``best.pt`` the same way and writes ``bench.md``/``bench.json``/``bench.png`` (see
:mod:`.accuracy`; ``task=segment|pose`` adds mask / pose mAP).
``yolo-gab bench speed key=value ...`` measures training-step time and peak memory of each arm relative to FP in the
same run (see :mod:`.speed`). ``yolo-gab bench deploy key=value ...`` exports FP and quantized models and measures
latency, throughput, size and mAP of each file in ONNX Runtime and OpenVINO (see :mod:`.deploy`).
``yolo-gab bench help`` / ``yolo-gab bench speed help`` / ``yolo-gab bench deploy help`` list the keys.

Examples:
    >>> from ultralytics_gabfusion.bench import bench_main
    >>> bench_main(["preset=demo", "out=runs/demo"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import sys

from .common import BenchError


def bench_main(argv: list[str]) -> int:
    """Entry point of ``yolo-gab bench``: dispatch to the accuracy or the speed benchmark.

    Args:
        argv (list[str]): Tokens after ``bench``, e.g. ``["speed", "device=cpu"]`` or ``["preset=demo"]``.

    Returns:
        (int): Exit status: 0 done, 1 some run failed (the others are still reported), 2 bad settings (nothing
            was trained or written).
    """
    argv = list(argv)
    try:
        # Imported on use: each benchmark loads only its own modules (the accuracy one pulls in the trainer).
        if argv and argv[0] == "deploy":
            from .deploy import deploy_main

            return deploy_main(argv[1:])
        if argv and argv[0] == "speed":
            from .speed import speed_main

            return speed_main(argv[1:])
        from .accuracy import accuracy_main

        return accuracy_main(argv[1:] if argv and argv[0] == "accuracy" else argv)  # "accuracy": the default, named
    except BenchError as e:
        cmd = f"bench {argv[0]}" if argv and argv[0] in ("speed", "deploy") else "bench"
        print(f"yolo-gab {cmd}: error: {e}", file=sys.stderr)
        return 2


__all__ = ["BenchError", "bench_main"]
