"""``yolo-gab bench speed``: training-step time and peak memory of FP vs QAT (+GABFusion, +ADA), same run.

What one step is: forward, detection loss (plus the ADA term), backward, gradient clipping and an SGD step, plus the
GABFusion lambda update where GABFusion is on; exactly the work GABTrainer adds per iteration, without data loading,
EMA or logging, which cost the same in every arm. The model is built from its YAML (``DetectionModel``) and set up by
the trainer's own path, :func:`~ultralytics_gabfusion.qat_setup.prepare_qat_model` (GABFusion, quantized convs,
weight and activation quantizer init, ADA with an in-memory FP copy as the frozen teacher), then trained on one fixed
synthetic batch (random image, 4 random boxes per image), so every arm does identical work apart from the method
itself. The set-up runs on the CPU and the model then moves to the device; it is not timed.

Timing: ``warmup`` steps are run and discarded, then the median of ``steps`` timed steps (CUDA synchronised
before and after each step) is reported, with its ratio to the FP arm measured in the same invocation.

Peak memory:
    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` per arm (tensor memory only,
      model + optimizer + activations; the caching allocator's reserve is not counted). Arms run in one process.
    * CPU: every arm runs in a fresh Python process and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at
      the end, i.e. the process's peak resident set including the interpreter, torch and Ultralytics (a few
      hundred MiB that every arm shares). The ratio to FP is therefore a lower bound of the ratio of the training
      memory itself; ``rss_base_mib`` (peak RSS after the imports, before the model exists) is recorded so the
      difference can be read off. Python-level tracing (tracemalloc) does not see torch's allocations.

Examples:
    yolo-gab bench speed                                   # GPU: 640 px, batch 32, AMP; CPU: 128 px, batch 4
    yolo-gab bench speed methods=[lsq,n2uq] imgsz=320 batch=8 steps=10 out=runs/speed
    yolo-gab bench speed kernels=[reference,compiled]       # both fake-quant paths, each against the same FP arm

Kernels: every quantized arm is measured once per entry of ``kernels`` (``qat_kernel``: reference, compiled, auto).
``first step ms`` is the first (warm-up) step, which includes compiling the fused kernels on a cold cache.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils import LOGGER

from ..fusion import update_fusion
from ..provenance import environment
from ..qat_setup import prepare_qat_model
from ..quant.kernels import set_qat_kernel
from ..settings import (
    ADA_DIVS,
    MAX_BITS,
    MIN_BITS,
    QAT_KERNELS,
    QATConfig,
    as_bool,
    as_float,
    as_int,
    as_int_list,
    as_list,
    as_str_list,
    parse_key_values,
    unknown_key_error,
)
from .arms import METHOD_DEFAULTS, METHODS
from .common import BenchError, child_env, cli_value, python, resolve_device, torch_device, write_json

try:
    import resource  # peak RSS of the isolated CPU arms
except ImportError:  # not on Windows
    resource = None

ARMS = ("fp", "fp+gab", "fp+ada", "q", "q+gab", "q+ada", "q+gab+ada")
DEFAULTS: dict[str, Any] = {
    "models": ["yolov5s"],
    "methods": list(METHODS),
    "bits": [4],
    "arms": ["fp", "q", "q+gab", "q+gab+ada"],
    "kernels": ["reference", "compiled"],
    "imgsz": None,  # 640 on CUDA, 128 on CPU
    "batch": None,  # 32 on CUDA, 4 on CPU
    "steps": None,  # 20 on CUDA, 5 on CPU
    "warmup": None,  # 3 on CUDA, 1 on CPU
    "device": None,
    "amp": None,  # True on CUDA
    "nc": 80,
    "ada": 0.01,
    "ada_div": None,  # kl, js for n2uq (as the accuracy bench)
    "isolate": None,  # a fresh process per arm: True on CPU (peak RSS), False on CUDA
    "interleave": False,  # all arms in one process, timed round-robin (ratios robust to a changing CPU load)
    "clock": "wall",  # wall | cpu (process CPU time: robust to other jobs on shared cores)
    "seed": 0,
    "out": "runs/gab-speed",
}
HELP = {
    "models": "model names/YAMLs (built from scratch; weights do not change the step cost)",
    "methods": "quantizers: lsq, lsqplus, pact, n2uq",
    "bits": "bit-widths (WbAb; first conv and Detect outputs stay 8-bit as in training)",
    "arms": "fp, q (QAT), q+gab, q+gab+ada (also fp+gab, fp+ada, q+ada)",
    "kernels": "fake-quant kernels measured for every quantized arm: reference, compiled, auto (qat_kernel)",
    "imgsz": "image size (default 640 on CUDA, 128 on CPU)",
    "batch": "batch size (default 32 on CUDA, 4 on CPU)",
    "steps": "timed steps, median reported (default 20 CUDA, 5 CPU)",
    "warmup": "untimed steps first (default 3 CUDA, 1 CPU)",
    "device": "cpu, 0, ... (default: 0 when CUDA is available)",
    "amp": "fp16 autocast + GradScaler (default True on CUDA)",
    "nc": "classes of the Detect head",
    "ada": "ADA weight of the +ada arms",
    "ada_div": "ADA divergence kl|js (default: kl, js for n2uq)",
    "isolate": "one fresh process per arm (default True on CPU: peak RSS per arm)",
    "interleave": "all arms in one process, one step each per round; ratio = median of per-round ratios (no memory)",
    "clock": "wall (elapsed time) or cpu (CPU time of this process: for CPU runs on cores shared with other jobs)",
    "seed": "seed of the weights and the synthetic batch",
    "out": "output directory for speed.md and speed.json",
}


def help_text() -> str:
    """The key table printed by ``yolo-gab bench speed help``."""
    w = max(len(k) for k in DEFAULTS) + 2
    lines = ["yolo-gab bench speed key=value ...   (training-step time and peak memory relative to FP)"]
    lines += [f"  {k:<{w}}{cli_value(v):<24}{HELP[k]}" for k, v in DEFAULTS.items()]
    return "\n".join(lines)


def resolve_settings(argv: list[str]) -> dict:
    """Parse and check the speed-bench keys; device-dependent defaults are filled in here.

    Args:
        argv (list[str]): ``key=value`` tokens after ``yolo-gab bench speed``.

    Returns:
        (dict): The keys of ``DEFAULTS``, normalised (``device`` resolved, ``out`` absolute).

    Raises:
        BenchError: An unknown key or a bad value (exit status 2).
    """
    user = parse_key_values(argv)
    for k in user:
        if k not in DEFAULTS:
            raise unknown_key_error(k, DEFAULTS, "bench speed")
    s = {**DEFAULTS, **user}
    s["device"] = resolve_device("device", s["device"])
    cuda = s["device"] not in ("cpu", "mps")
    if cuda and "," in s["device"]:
        raise BenchError(f"device={s['device']}: the speed bench measures one device; pass a single GPU index.")
    s["models"] = list(dict.fromkeys(str(x).strip() for x in as_list("models", s["models"]) if str(x).strip()))
    if not s["models"]:
        raise BenchError("'models' is empty: give at least one model, e.g. models=[yolov5s].")
    for m in s["models"]:
        y = m if m.endswith((".yaml", ".yml")) else f"{m}.yaml"
        if m.endswith(".pt"):
            raise BenchError(f"models: '{m}': the speed bench builds models from YAML (weights do not change the "
                             f"step cost); pass its name, e.g. yolov5s.")
        try:
            yaml_model_load(y)
        except Exception:
            raise BenchError(f"models: '{m}' is not a known model YAML ({y} not found).") from None
    s["methods"] = as_str_list("methods", s["methods"], METHODS)
    s["bits"] = as_int_list("bits", s["bits"], MIN_BITS, MAX_BITS)
    s["arms"] = as_str_list("arms", s["arms"], ARMS)
    s["kernels"] = list(dict.fromkeys(as_str_list("kernels", s["kernels"], QAT_KERNELS)))
    if "fp" not in s["arms"]:
        s["arms"] = ["fp", *s["arms"]]  # ratios are always to an FP step measured in the same run
    s["imgsz"] = as_int("imgsz", s["imgsz"] if s["imgsz"] is not None else (640 if cuda else 128), 32)
    if s["imgsz"] % 32:
        raise BenchError(f"imgsz={s['imgsz']} must be a multiple of 32.")
    s["batch"] = as_int("batch", s["batch"] if s["batch"] is not None else (32 if cuda else 4), 1)
    s["steps"] = as_int("steps", s["steps"] if s["steps"] is not None else (20 if cuda else 5), 1)
    s["warmup"] = as_int("warmup", s["warmup"] if s["warmup"] is not None else (3 if cuda else 1), 0)
    s["amp"] = as_bool("amp", s["amp"] if s["amp"] is not None else cuda)
    if s["amp"] and not cuda:
        raise BenchError("amp=True needs a CUDA device (CPU steps run in float32); drop amp or pass device=0.")
    s["interleave"] = as_bool("interleave", s["interleave"])
    s["clock"] = as_str_list("clock", s["clock"], ("wall", "cpu"))[0]
    if s["clock"] == "cpu" and cuda:
        raise BenchError("clock=cpu measures CPU time, which does not include GPU work: use clock=wall on CUDA.")
    s["isolate"] = as_bool("isolate", s["isolate"] if s["isolate"] is not None else not (cuda or s["interleave"]))
    if s["interleave"] and s["isolate"]:
        raise BenchError("interleave=True runs every arm in one process: drop isolate=True (or interleave).")
    s["nc"] = as_int("nc", s["nc"], 1)
    s["ada"] = as_float("ada", s["ada"], 0.0, lo_open=True)
    if s["ada_div"] is not None:
        s["ada_div"] = as_str_list("ada_div", s["ada_div"], ADA_DIVS)[0]
    s["seed"] = as_int("seed", s["seed"], 0)
    out = Path(str(s["out"])).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise BenchError(f"out={s['out']} is a file; pass a directory.")
    s["out"] = out
    return s


def plan(s: dict) -> list[dict]:
    """One spec per measured arm: FP arms once per model, quantized arms per method x bits."""
    specs = []
    common = {k: s[k] for k in ("imgsz", "batch", "steps", "warmup", "device", "amp", "nc", "ada", "seed", "clock")}
    for model in s["models"]:
        for arm in s["arms"]:
            if arm.startswith("fp"):
                specs.append({**common, "model": model, "arm": arm, "method": None, "bits": None,
                              "ada_div": s["ada_div"] or "kl", "kernel": None})
        for method in s["methods"]:
            for bits in s["bits"]:
                for arm in s["arms"]:
                    if arm.startswith("q"):
                        div = s["ada_div"] or METHOD_DEFAULTS[method]["ada_div"]
                        for kernel in s["kernels"]:
                            specs.append({**common, "model": model, "arm": arm, "method": method, "bits": bits,
                                          "ada_div": div, "kernel": kernel})
    return specs


# ================================================================================================ measuring
def _synthetic_batch(batch: int, imgsz: int, nc: int, device, seed: int) -> dict:
    """A fixed detection batch: uniform image, 4 boxes per image (normalised xywh), random classes."""
    g = torch.Generator().manual_seed(seed)
    n = 4 * batch
    wh = 0.05 + 0.3 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    return {
        "img": torch.rand(batch, 3, imgsz, imgsz, generator=g).to(device),
        "batch_idx": torch.arange(batch).repeat_interleave(4).float().to(device),
        "cls": torch.randint(0, nc, (n, 1), generator=g).float().to(device),
        "bboxes": torch.cat([xy, wh], 1).to(device),
    }


def arm_config(spec: dict) -> QATConfig:
    """The plugin settings of one arm, validated as the trainer validates a run's keys.

    Args:
        spec (dict): One entry of :func:`plan` (``arm``, ``method``, ``bits``, ``ada``, ``ada_div``, ``kernel``).

    Returns:
        (QATConfig): ``qat``/bits from the method (``none`` for FP arms), ``gab=balanced`` for ``+gab`` arms, the ADA
            weight and divergence for ``+ada`` arms, one calibration batch.
    """
    arm = spec["arm"]
    keys = {"qat": spec["method"] or "none", "gab": "balanced" if "gab" in arm else "off",
            "ada": spec["ada"] if "ada" in arm else 0.0, "ada_div": spec["ada_div"],
            "qat_calib": 1,  # the one synthetic batch
            "qat_kernel": spec.get("kernel") or "auto"}
    if spec["bits"] is not None:
        keys.update(w_bits=spec["bits"], a_bits=spec["bits"])
    return QATConfig.from_keys(keys)


def build_arm(spec: dict, device: torch.device):
    """Build one arm as GABTrainer sets up a run (structure, quantizer init, calibration, ADA).

    Args:
        spec (dict): One entry of :func:`plan`.
        device (torch.device): Where the arm is trained.

    Returns:
        (tuple): ``(model, ADALoss or None, batch)``, all on ``device``.
    """
    torch.manual_seed(spec["seed"])
    yaml = spec["model"] if spec["model"].endswith((".yaml", ".yml")) else f"{spec['model']}.yaml"
    model = DetectionModel(yaml, nc=spec["nc"], verbose=False)
    model.args = get_cfg()  # the loss reads box/cls/dfl gains from model.args, as after set_model_attributes
    cfg = arm_config(spec)
    teacher = deepcopy(model) if cfg.ada > 0 else None  # FP copy: same weights, as the FP checkpoint would be
    batch = _synthetic_batch(spec["batch"], spec["imgsz"], spec["nc"], device, spec["seed"])
    model, ada = prepare_qat_model(model, cfg, [batch["img"]], teacher=teacher, device=device)
    return model, ada, batch


class _ArmRunner:
    """One built arm (model, optimizer, batch) that runs and times single training steps."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.device = torch_device(spec["device"])
        self.cuda = self.device.type == "cuda"
        set_qat_kernel(spec.get("kernel") or "auto")
        self.model, self.ada, self.batch = build_arm(spec, self.device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9, nesterov=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=spec["amp"] and self.cuda)
        self.loss = None

    def step(self) -> float:
        """One training step; returns its wall time in ms."""
        set_qat_kernel(self.spec.get("kernel") or "auto")  # process-wide: set before every step (interleaved arms)
        model, scaler, opt = self.model, self.scaler, self.opt
        clock = time.process_time if self.spec.get("clock") == "cpu" else time.perf_counter
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = clock()
        with torch.autocast(self.device.type, enabled=self.spec["amp"] and self.cuda):
            loss, _ = model.loss(self.batch)
        scaler.scale(loss.sum()).backward()
        if "gab" in self.spec["arm"]:  # GABTrainer.optimizer_step: lambda update from the branch gradient norms
            update_fusion(model, grad_scale=scaler.get_scale() if scaler.is_enabled() else None)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(self.params, max_norm=10.0)  # as BaseTrainer.optimizer_step
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.loss = loss
        return (clock() - t0) * 1000

    def close(self) -> None:
        if self.ada is not None:
            self.ada.detach()
        self.model = self.opt = self.ada = self.batch = self.loss = None


def measure(spec: dict) -> dict:
    """Time ``warmup + steps`` training steps of one arm; returns times (ms) and the CUDA peak (MiB)."""
    device = torch_device(spec["device"])
    gc.collect()  # the previous arm's model/teacher sit in reference cycles (hooks, criterion) until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    arm = _ArmRunner(spec)
    times = [arm.step() for _ in range(spec["warmup"] + spec["steps"])]
    out = {"step_ms": statistics.median(times[spec["warmup"]:]),
           "step_ms_all": [round(t, 3) for t in times[spec["warmup"]:]], "loss": float(arm.loss.detach().sum()),
           "first_step_ms": round(times[0], 1)}  # the first step includes kernel compilation (kernel=compiled)
    if arm.cuda:
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["memory_method"] = "torch.cuda.max_memory_allocated"
    arm.close()
    return out


def measure_interleaved(specs: list[dict]) -> list[dict]:
    """Build every arm in this process and time them round-robin, one step per arm per round.

    On a machine whose load changes (shared CPU cores), arms measured one after another see different loads; here
    every round runs each arm once within a few seconds, and ``step_ratio`` is the median over rounds of the arm's
    step time divided by the FP arm's step time in the same round. Peak memory is not measured (one process).
    """
    runners = [_ArmRunner(spec) for spec in specs]
    first = [r.step() for r in runners]  # compilation happens here, outside the timed rounds
    for _ in range(specs[0]["warmup"] - 1):
        for r in runners:
            r.step()
    rounds = [[r.step() for r in runners] for _ in range(specs[0]["steps"])]
    fp = next((i for i, s in enumerate(specs) if s["arm"] == "fp"), None)
    out = []
    for i, r in enumerate(runners):
        times = [rd[i] for rd in rounds]
        res = {"step_ms": statistics.median(times), "step_ms_all": [round(t, 3) for t in times],
               "loss": float(r.loss.detach().sum()), "first_step_ms": round(first[i], 1)}
        if fp is not None:
            res["step_ratio_paired"] = statistics.median(rd[i] / rd[fp] for rd in rounds)
        out.append(res)
        r.close()
    return out


def _rss_mib() -> float:
    if resource is None:
        raise RuntimeError("peak RSS per arm needs the Unix 'resource' module; pass isolate=False on this system.")
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _worker(spec_json: str) -> None:
    """Child-process entry: measure one arm and print one JSON line (peak RSS of this fresh process added).

    Torch, Ultralytics and the plugin (GABFusion registered for ``*-gab.yaml``) are imported with this module, so the
    base RSS includes them, as in every arm.
    """
    spec = json.loads(spec_json)
    base = _rss_mib()
    out = measure(spec)
    if "peak_mib" not in out:
        out["peak_mib"] = _rss_mib()
        out["rss_base_mib"] = base
        out["memory_method"] = "peak RSS (ru_maxrss) of a fresh process per arm"
    print("GAB_SPEED_RESULT " + json.dumps(out), flush=True)


def _measure_isolated(spec: dict) -> dict:
    code = "import sys; from ultralytics_gabfusion.bench.speed import _worker; _worker(sys.argv[1])"
    r = subprocess.run([python(), "-c", code, json.dumps(spec)], capture_output=True, text=True, env=child_env())
    for line in r.stdout.splitlines():
        if line.startswith("GAB_SPEED_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"speed worker failed (exit {r.returncode}): {(r.stderr or r.stdout)[-2000:]}")


# ================================================================================================ reporting
def _label(r: dict) -> str:
    if r["method"] is None:
        return r["arm"]
    return f"{r['arm']} {r['method']} W{r['bits']}A{r['bits']} ({r.get('kernel') or 'auto'} kernels)"


def speed_markdown(result: dict) -> str:
    """``speed.md``: one row per arm with its ratio to the FP arm of the same model."""
    s, env = result["settings"], result["environment"]
    lines = [
        "# ultralytics-gabfusion training-step cost",
        "",
        f"- device: {env['hardware']}; torch {env['torch']}, ultralytics {env['ultralytics']}, plugin "
        f"{env['ultralytics_gabfusion']}, commit {env['git_commit'] or 'unknown'}",
        f"- step = forward + loss (+ADA) + backward + clip + SGD (+GABFusion update); imgsz {s['imgsz']}, batch "
        f"{s['batch']}, amp {s['amp']}, nc {s['nc']}; median of {s['steps']} steps after {s['warmup']} warm-up; "
        f"{'process CPU time' if s.get('clock') == 'cpu' else 'wall time'}",
        f"- peak memory: {result['memory_method']}",
        *([f"- interleaved: all arms in one process, one step each per round; × FP = median over the {s['steps']} "
           f"rounds of (arm step / FP step of the same round)"] if s.get("interleave") else []),
        "",
    ]
    cpu = any("rss_base_mib" in r for r in result["rows"])
    extra_h = " above imports MiB | × FP |" if cpu else ""
    lines += [f"| model | arm | method | bits | kernel | step ms | × FP | first step ms | peak MiB | × FP |{extra_h}",
              "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu else "")]
    for r in result["rows"]:
        if r.get("error") or "step_ratio" not in r:
            lines.append(f"| {r['model']} | {r['arm']} | {r['method'] or '—'} | — | {r.get('kernel') or '—'} | failed "
                         f"| — | — | — | — |" + (" — | — |" if cpu else ""))
            continue
        bits = "FP" if r["bits"] is None else f"W{r['bits']}A{r['bits']}"
        extra = f" {r['train_mib']:.0f} | {r['train_mem_ratio']:.2f} |" if cpu and "train_mib" in r else ""
        mem = "— | —" if r["mem_ratio"] is None else f"{r['peak_mib']:.0f} | {r['mem_ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['arm']} | {r['method'] or '—'} | {bits} | {r.get('kernel') or '—'} | "
                     f"{r['step_ms']:.1f} | {r['step_ratio']:.2f} | {r.get('first_step_ms', float('nan')):.0f} | {mem} |{extra}")
    if cpu:
        base = statistics.median(r["rss_base_mib"] for r in result["rows"] if "rss_base_mib" in r)
        lines += ["", f"Peak RSS includes ~{base:.0f} MiB of interpreter + libraries present before the model is "
                      f"built (same in every arm); 'above imports' = peak RSS minus that process's RSS after the "
                      f"imports, i.e. model + optimizer + activations (+ teacher)."]
    return "\n".join(lines) + "\n"


def run_speed(s: dict) -> int:
    """Measure every planned arm, compute ratios to FP, write ``speed.md``/``speed.json``; returns exit status."""
    t0 = time.perf_counter()
    env = environment(s["device"])
    specs = plan(s)
    rows, failed = [], 0
    if s["interleave"]:
        results = []
        for model in s["models"]:
            group = [sp for sp in specs if sp["model"] == model]
            LOGGER.info(f"bench speed: {model}: {len(group)} arms interleaved in one process ...")
            results += measure_interleaved(group)
        for spec, res in zip(specs, results):
            rows.append({k: spec.get(k) for k in ("model", "arm", "method", "bits", "ada_div", "kernel")} | res)
    for spec in specs if not s["interleave"] else []:
        LOGGER.info(f"bench speed: {spec['model']} {_label(spec)} ...")
        try:
            res = _measure_isolated(spec) if s["isolate"] else measure(spec)
        except Exception as e:  # report the others; this arm is marked failed (exit status 1)
            LOGGER.error(f"bench speed: {spec['model']} {_label(spec)} failed: {type(e).__name__}: {e}")
            res, failed = {"error": f"{type(e).__name__}: {e}"}, failed + 1
        row = {k: spec.get(k) for k in ("model", "arm", "method", "bits", "ada_div", "kernel")} | res
        rows.append(row)
        if "step_ms" in res:
            peak = f", peak {res['peak_mib']:.0f} MiB" if res.get("peak_mib") else ""
            LOGGER.info(f"bench speed:   {res['step_ms']:.1f} ms/step{peak}")
    for r in rows:
        fp = next((x for x in rows if x["model"] == r["model"] and x["arm"] == "fp" and "step_ms" in x), None)
        if "step_ms" in r and fp:
            r.setdefault("peak_mib", None)  # CPU without isolate: no per-arm peak can be measured in one process
            r["step_ratio"] = r.pop("step_ratio_paired", None) or r["step_ms"] / fp["step_ms"]
            r["mem_ratio"] = r["peak_mib"] / fp["peak_mib"] if r["peak_mib"] and fp.get("peak_mib") else None
            if "rss_base_mib" in r and "rss_base_mib" in fp:  # CPU: what the training itself added to the process
                r["train_mib"] = r["peak_mib"] - r["rss_base_mib"]
                r["train_mem_ratio"] = r["train_mib"] / max(fp["peak_mib"] - fp["rss_base_mib"], 1e-9)
        elif "step_ms" in r:
            r["error"] = "no FP reference"
    s_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in s.items()}
    methods = {r.get("memory_method") for r in rows if r.get("memory_method")} or \
        {"not measured (CPU in one process: pass isolate=True for a fresh process per arm)"}
    result = {
        "format": "ultralytics-gabfusion bench speed v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": s_json,
        "environment": env,
        "memory_method": ", ".join(sorted(methods)) or "n/a",
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    s["out"].mkdir(parents=True, exist_ok=True)
    write_json(s["out"] / "speed.json", result)
    md = speed_markdown(result)
    (s["out"] / "speed.md").write_text(md)
    print(md, flush=True)
    LOGGER.info(f"bench speed: results in {s['out']} (speed.md, speed.json); {result['wall_s']:.0f} s")
    return 1 if failed else 0


def speed_main(argv: list[str]) -> int:
    """``yolo-gab bench speed key=value ...``; see the module docstring."""
    if argv and argv[0] in ("help", "-h", "--help"):
        print(help_text())
        return 0
    return run_speed(resolve_settings(argv))


__all__ = ["DEFAULTS", "arm_config", "build_arm", "measure", "measure_interleaved", "plan", "resolve_settings", "run_speed",
           "speed_main"]
