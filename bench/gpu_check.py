"""The GPU check: kiln's `gpu`-marked tests and its GPU benchmarks, in one command and one JSON report.

    python bench/gpu_check.py                          # writes runs/gpu_check.json (+ runs/gpu_check-logs/)
    python bench/gpu_check.py --out /tmp/r.json --parts step,checkpoint --budget-s 540
    bench/gpu_check.sh                                 # a lent GPU machine: deps from a wheel dir (see README)

What it runs, each part in its own process (a crash or a hang in one does not stop the others;
each has a timeout) with this interpreter and this PYTHONPATH, so it works where kiln is not
pip-installed and the machine's own torch is used:

* environment: Python, torch, CUDA, the GPUs, kiln's dependency versions, TE/flash-attn present or not;
* ``step``: bench/step_overhead.py on the 1B preset (configs/llama3-1b.yaml, bf16, one GPU): tokens/s,
  TFLOP/s per GPU, MFU, peak memory, and kiln's step against a plain PyTorch loop with the same
  precision and fp32 master weights; run again at micro-batch 1 if micro-batch 2 runs out of memory;
* ``fp8``: bench/fp8.py on the same preset: kiln's step with torchao's FP8 GEMMs (tensorwise) against
  bf16, tokens/s and their ratio (micro-batch 1 on out-of-memory as well; skipped without torchao);
* ``checkpoint``: bench/checkpoint.py --preset gpu: how long an async save blocks training against
  a synchronous save (a ~125M model: a 1B checkpoint with fp32 masters and Adam states is ~17 GB a
  save, and the bench keeps several, more than a lent machine's disk holds);
* ``tests``: ``pytest -m gpu tests`` (pass/fail/skip counts and every test's outcome).

Without a CUDA GPU (or with ``--cpu-smoke``) it runs the CPU-side part: the gpu tests (they skip)
and tiny CPU variants of the benchmarks through the same code paths, to show the plumbing works.
The report then marks every GPU metric ``measured: false`` with the reason, and the verdict
``not measured``: a CPU machine never reports an MFU. The report is rewritten after every part,
so a run cut off by a machine's time limit still leaves what it finished.

Exit status: 0 when every part ran (or is unavailable: the fp8 part without torchao) and no test
failed (a missed target is in the verdict, not the exit status), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The headline numbers first: a machine lent for a few minutes should give those before the tests.
PARTS = ("step", "fp8", "checkpoint", "tests")
TIMEOUTS_S = {"step": 420, "fp8": 420, "checkpoint": 300, "tests": 420}
REPORT_VERSION = 1

# name → (comparison, threshold, what it judges). The step and checkpoint targets are the ones
# bench/step_overhead.py and bench/checkpoint.py print.
TARGETS = {
    "mfu": (">=", 0.40, "MFU of kiln's step, 1B preset, bf16, one GPU, without Transformer Engine"),
    "step_ratio": ("<=", 1.05, "kiln step time / plain PyTorch loop (same model, bf16, fp32 master weights)"),
    "checkpoint_stall_ratio": ("<=", 0.10, "training time an async save blocks / a synchronous save blocks"),
}
# Versions worth knowing when a number looks wrong: (distribution name, import name).
PACKAGES = [("megatron-core", "megatron.core"), ("deepspeed", "deepspeed"), ("mosaicml-streaming", "streaming"),
            ("transformer-engine", "transformer_engine"), ("flash-attn", "flash_attn"), ("torchao", "torchao"),
            ("wandb", "wandb"), ("numpy", "numpy"), ("triton", "triton"), ("transformers", "transformers"),
            ("pytest", "pytest")]

# The CPU-side run: the 1B preset's own code path (its config file, bf16, the fp32-master plain loop)
# shrunk until a step takes milliseconds on 2 cores. Nothing it measures is a GPU number.
CPU_SMOKE_1B = ["model.num_layers=2", "model.hidden_size=128", "model.num_attention_heads=4",
                "model.num_query_groups=2", "model.ffn_hidden_size=256", "model.vocab_size=512", "model.seq_len=128",
                "train.device=cpu"]
CPU_SMOKE_CHECKPOINT = ["--preset", "cpu", "--layers", "2", "--hidden", "128", "--heads", "4", "--seq-len", "64",
                        "--micro-batch", "2", "--save-every", "2", "--saves", "1", "--rounds", "1", "--warmup", "1"]
PART_DESCRIPTIONS = {  # part → (without a GPU, with one)
    "tests": ("pytest -m gpu tests: without CUDA every one of them skips", "pytest -m gpu tests on the GPU"),
    "step": ("CPU smoke run of the 1B preset's code path, shrunk: checks the plumbing; its numbers are not GPU "
             "metrics", "kiln's step against a plain PyTorch loop, 1B preset, bf16, one GPU"),
    "fp8": ("CPU smoke run of the FP8 benchmark, shrunk (torchao's float8 GEMMs have CPU kernels): checks the "
            "plumbing; its numbers are not GPU metrics", "kiln's step with torchao FP8 GEMMs against bf16, 1B preset, "
            "one GPU"),
    "checkpoint": ("CPU smoke run of the checkpoint benchmark: checks the plumbing; its numbers are not GPU metrics",
                   "async against sync checkpoint stall, ~125M model (--preset gpu), bf16, one GPU"),
}
OUT_OF_MEMORY = ("OutOfMemoryError", "CUDA out of memory")


# -- environment ------------------------------------------------------------------------------
def probe_environment() -> dict:
    """What this interpreter sees: runs in a child process (``--probe-environment``), so the check
    itself never holds a CUDA context while the benchmarks measure memory, and a broken torch
    install is reported instead of stopping the check."""
    import importlib.metadata
    import importlib.util

    import torch

    env: dict = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                 "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available(), "gpus": []}
    if env["cuda_available"]:
        env["cudnn"] = torch.backends.cudnn.version()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            env["gpus"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                "compute_capability": f"{props.major}.{props.minor}",
                                "multiprocessors": props.multi_processor_count})
        try:  # what MFU is computed against; a kiln that does not import still gets its GPU checked
            sys.path.insert(0, str(REPO))
            from kiln.plan.flops import peak_flops

            env["peak_bf16_tflops"] = (peak_flops(torch.device("cuda", 0)) or 0) / 1e12 or None
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            env["peak_bf16_tflops"] = f"unknown: {type(err).__name__}: {err}"
    packages = {}
    for dist, module in PACKAGES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        packages[dist] = {"version": version, "present": importlib.util.find_spec(module.split(".")[0]) is not None}
    env["packages"] = packages
    return env


def environment(child_env: dict) -> dict:
    out = None
    try:
        out = subprocess.run([sys.executable, __file__, "--probe-environment"], cwd=REPO, env=child_env,
                             capture_output=True, text=True, timeout=300)
        env = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as err:
        env = {"cuda_available": False, "probe_error": (f"{out.stdout}{out.stderr}" if out else str(err))[-3000:]}
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain")) if commit else None
    env["kiln"] = {"path": str(REPO), "commit": commit, "dirty": dirty}
    env["nvidia_smi"] = _command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"])
    env["pythonpath"] = child_env.get("PYTHONPATH", "")
    return env


def _git(*args: str) -> str | None:
    # The lent GPU machine gets a copy of the working tree without .git: no commit to record there.
    return _command_output(["git", "-C", str(REPO), *args])


def _command_output(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# -- running the parts --------------------------------------------------------------------------
def run_logged(command: list[str], log_path: Path, child_env: dict, timeout_s: float) -> dict:
    """Run one part in its own session (its process group is killed on timeout, checkpoint writers
    included), stdout and stderr into log_path."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode, timed_out = process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            _kill_group(process)
            returncode, timed_out = process.returncode, True
        except BaseException:  # Ctrl-C: leave no benchmark running on the GPU
            _kill_group(process)
            raise
    output = log_path.read_text(errors="replace")
    status = "timeout" if timed_out else ("ok" if returncode == 0 else "failed")
    record = {"status": status, "command": command, "returncode": returncode,
              "duration_s": round(time.monotonic() - started, 1), "log": str(log_path)}
    if status != "ok":
        record["output_tail"] = output[-4000:]
        if timed_out:
            record["timeout_s"] = timeout_s
    return record


def _kill_group(process: subprocess.Popen) -> None:
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tests(logs: Path, child_env: dict, timeout_s: float) -> dict:
    junit = logs / "gpu-tests.xml"
    record = run_logged([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
                         f"--junitxml={junit}"], logs / "gpu-tests.log", child_env, timeout_s)
    # pytest exits 1 when a test fails: the part ran; the counts say how the tests went.
    if record["status"] == "failed" and record["returncode"] == 1 and junit.is_file():
        record["status"] = "ok"
    record.update(junit_counts(junit))
    return record


def junit_counts(path: Path) -> dict:
    """Pass/fail/skip counts and each test's outcome from pytest's JUnit XML (None when missing)."""
    if not path.is_file():
        return {"passed": None, "failed": None, "errors": None, "skipped": None, "tests": []}
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "time_s": float(case.get("time") or 0), "message": message})
    return {key: sum(t["outcome"] == outcome for t in tests)
            for key, outcome in (("passed", "passed"), ("failed", "failed"), ("errors", "error"),
                                 ("skipped", "skipped"))} | {"tests": tests}


def run_bench(name: str, command: list[str], logs: Path, child_env: dict, timeout_s: float) -> dict:
    """A benchmark that writes its numbers with ``--json PATH``; the numbers go into the report."""
    result_path = logs / f"{name}.json"
    result_path.unlink(missing_ok=True)
    record = run_logged([*command, "--json", str(result_path)], logs / f"{name}.log", child_env, timeout_s)
    if record["status"] == "ok":
        try:
            record["result"] = json.loads(result_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            record.update(status="failed", error=f"no readable --json output: {err}")
    return record


def step_commands(gpu: bool) -> list[tuple[str, list[str]]]:
    """(log name, command) of the step benchmark, then of its fallback: micro-batch 1 if the preset's
    2 runs out of memory (kiln's and the plain loop's models share the GPU for the comparison)."""
    bench = [sys.executable, "bench/step_overhead.py", "--preset", "1b"]
    if not gpu:
        return [("step_overhead", [*bench, "--warmup", "1", "--rounds", "2", "--steps-per-round", "1", *CPU_SMOKE_1B])]
    return [("step_overhead", bench), ("step_overhead-mb1", [*bench, "train.micro_batch_size=1"])]


def fp8_commands(gpu: bool) -> list[tuple[str, list[str]]]:
    """(log name, command) of the FP8 benchmark and its micro-batch 1 fallback (both runs share the GPU)."""
    bench = [sys.executable, "bench/fp8.py"]
    if not gpu:
        return [("fp8", [*bench, "--warmup", "1", "--rounds", "2", "--steps-per-round", "1", *CPU_SMOKE_1B])]
    return [("fp8", bench), ("fp8-mb1", [*bench, "train.micro_batch_size=1"])]


def run_with_fallback(part: str, commands: list[tuple[str, list[str]]], logs: Path, child_env: dict,
                      timeout: "Timeouts") -> dict:
    """Each command in turn while the one before ran out of GPU memory; the last one's record."""
    attempts = []
    for name, command in commands:
        budget = timeout.for_part(part)
        if budget is None:
            break
        attempts.append(run_bench(name, command, logs, child_env, budget))
        if not any(marker in attempts[-1].get("output_tail", "") for marker in OUT_OF_MEMORY):
            break
    if not attempts:
        return {"status": "skipped", "why": "no time left in --budget-s"}
    record = dict(attempts[-1])
    if len(attempts) > 1:
        record["earlier_attempts"] = [{k: v for k, v in a.items() if k != "result"} for a in attempts[:-1]]
    return record


def checkpoint_command(gpu: bool) -> list[str]:
    bench = [sys.executable, "bench/checkpoint.py"]
    return [*bench, "--preset", "gpu"] if gpu else [*bench, *CPU_SMOKE_CHECKPOINT]


class Timeouts:
    """Each part's timeout, capped by what is left of an overall budget (a lent machine's call limit)."""

    def __init__(self, per_part: dict[str, float], budget_s: float | None) -> None:
        self.per_part, self.deadline = per_part, None if budget_s is None else time.monotonic() + budget_s

    def for_part(self, part: str) -> float | None:
        """Seconds this part may run, or None when the budget is spent (under 10 s is not worth starting)."""
        if self.deadline is None:
            return self.per_part[part]
        left = self.deadline - time.monotonic()
        return min(self.per_part[part], left) if left >= 10 else None


# -- what the report concludes ------------------------------------------------------------------
def _metric(value, unit: str, why_not: str | None) -> dict:
    if why_not is None and value is None:
        why_not = "the benchmark did not report it"
    if why_not is not None:
        return {"value": None, "unit": unit, "measured": False, "why_not": why_not}
    return {"value": value, "unit": unit, "measured": True}


def _gpu_result(part: dict, label: str, why_no_gpu: str | None) -> tuple[dict | None, str | None]:
    """A benchmark's numbers when they are a GPU measurement, else None and why not."""
    if why_no_gpu is not None:
        return None, why_no_gpu
    if part["status"] in ("skipped", "pending", "unavailable"):
        return None, f"the {label} has not run" + (f" ({part['why']})" if part.get("why") else "")
    if part["status"] != "ok":
        return None, f"the {label} {part['status']} (see its log)"
    result = part["result"]
    if result.get("device") != "cuda":  # never let a CPU number stand in for a GPU one
        return None, f"the {label} ran on {result.get('device')!r}, not on a CUDA GPU"
    return result, None


def gpu_metrics(parts: dict, why_no_gpu: str | None) -> dict:
    """The headline numbers; each is a measurement on a CUDA GPU, or ``measured: false`` and why not."""
    step, step_why = _gpu_result(parts["step"], "step benchmark", why_no_gpu)
    ckpt, ckpt_why = _gpu_result(parts["checkpoint"], "checkpoint benchmark", why_no_gpu)
    loops = step["loops"] if step else {"kiln": {}, "plain": {}}
    mfu_why = step_why or (None if step.get("peak_flops") else
                           f"the peak FLOP/s of {step.get('device_name')} is not known to kiln.plan.flops")
    metrics = {}
    for prefix, loop in (("", loops["kiln"]), ("plain_", loops["plain"])):
        memory = (loop.get("peak_memory") or {}).get("allocated_gib")
        metrics |= {
            f"{prefix}tokens_per_s": _metric(loop.get("tokens_per_s"), "tokens/s", step_why),
            f"{prefix}tflops_per_gpu": _metric(loop.get("tflops_per_device"), "TFLOP/s", step_why),
            f"{prefix}mfu": _metric(loop.get("mfu"), "fraction of peak dense bf16", mfu_why),
            f"{prefix}peak_memory_gib": _metric(memory, "GiB allocated" + (" over kiln's resident state"
                                                                            if prefix else ""), step_why),
        }
    metrics["step_ratio"] = _metric(step and step["ratio_kiln_plain"], "kiln / plain step time", step_why)
    fp8, fp8_why = _gpu_result(parts["fp8"], "fp8 benchmark", why_no_gpu)
    metrics["fp8_tokens_per_s"] = _metric(fp8 and fp8["precisions"]["fp8"]["tokens_per_s"], "tokens/s", fp8_why)
    metrics["fp8_speedup"] = _metric(fp8 and fp8["ratio_fp8_bf16"], "torchao fp8 / bf16 tokens/s", fp8_why)
    variants = ckpt["variants"] if ckpt else {"async": {}, "sync": {}}
    metrics["checkpoint_async_blocked_s"] = _metric(variants["async"].get("blocked_s"), "s per save", ckpt_why)
    metrics["checkpoint_sync_blocked_s"] = _metric(variants["sync"].get("blocked_s"), "s per save", ckpt_why)
    metrics["checkpoint_stall_ratio"] = _metric(ckpt and ckpt["ratio_async_sync"], "async / sync blocked", ckpt_why)
    return metrics


def verdict(metrics: dict, environment: dict) -> dict:
    out = {}
    for name, (comparison, threshold, what) in TARGETS.items():
        metric = metrics[name]
        entry = {"target": f"{comparison} {threshold}", "what": what, "value": metric["value"]}
        if not metric["measured"]:
            entry.update(status="not measured", why_not=metric["why_not"])
        else:
            met = metric["value"] >= threshold if comparison == ">=" else metric["value"] <= threshold
            entry["status"] = "pass" if met else "miss"
        out[name] = entry
    if (environment.get("packages", {}).get("transformer-engine") or {}).get("present"):
        out["mfu"]["note"] = "Transformer Engine is installed: the target is set for the path without it"
    return out


# -- the report ---------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(partial, path)  # a reader (or a killed run) never sees half a report


def child_environment() -> dict:
    """This environment for every part, with the repository on PYTHONPATH (after what is there:
    on a lent machine that is the directory kiln's dependencies were installed into)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO) not in [str(Path(p).resolve()) for p in paths]:
        paths.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _format(metric: dict, spec: str) -> str:
    return format(metric["value"], spec) if metric["measured"] else "—"


def print_summary(report: dict, out: Path) -> None:
    env, metrics = report["environment"], report["metrics"]
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in env.get("gpus", [])) or "no CUDA GPU"
    print(f"\nkiln GPU check ({report['mode']}): {gpus}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
          f"Python {env.get('python')}")
    packages = env.get("packages", {})
    print("packages: " + ", ".join(f"{name} {(packages.get(name) or {}).get('version') or 'absent'}"
                                   for name in ("megatron-core", "deepspeed", "mosaicml-streaming",
                                                "transformer-engine", "flash-attn", "torchao")))
    for name, part in report["parts"].items():
        detail = f"{part.get('duration_s', 0):.0f} s"
        if name == "step" and part.get("result"):
            result = part["result"]
            detail = (f"{result['model']['params'] / 1e6:,.1f}M params, seq {result['model']['seq_len']}, "
                      f"micro-batch {result['micro_batch_size']}, {result['precision']} on {result['device']}; "
                      + detail)
        if name == "tests" and part.get("passed") is not None:
            detail = (f"{part['passed']} passed, {part['failed']} failed, {part['errors']} errors, "
                      f"{part['skipped']} skipped; " + detail)
        why = part.get("why") or part.get("error") or ""
        print(f"  {name:<11}{part['status']:<9}{detail}{'; ' + why if why else ''}")
    if report["why_no_gpu"]:
        print(f"GPU metrics not measured: {report['why_no_gpu']}")
    print(f"tokens/s {_format(metrics['tokens_per_s'], ',.0f')} | TFLOP/s per GPU "
          f"{_format(metrics['tflops_per_gpu'], '.1f')} | MFU {_format(metrics['mfu'], '.1%')} | peak memory "
          f"{_format(metrics['peak_memory_gib'], '.1f')} GiB | kiln/plain {_format(metrics['step_ratio'], '.3f')} | "
          f"fp8/bf16 tokens/s {_format(metrics['fp8_speedup'], '.3f')} | "
          f"async/sync checkpoint stall {_format(metrics['checkpoint_stall_ratio'], '.3f')}")
    print("verdict: " + "; ".join(f"{name} {v['status']}" + (f" ({v['value']:.3g} {v['target']})"
                                                            if v["value"] is not None else f" ({v['target']})")
                                  for name, v in report["verdict"].items()))
    print(f"report: {out} (logs in {out.with_name(out.stem + '-logs')})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check.json", help="the JSON report (default runs/gpu_check.json)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default {','.join(PARTS)})")
    parser.add_argument("--cpu-smoke", action="store_true", help="the CPU-side part only, even on a GPU machine")
    parser.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                        help="a part's time limit (defaults: " + ", ".join(f"{k}={v}" for k, v in TIMEOUTS_S.items())
                             + ")")
    parser.add_argument("--budget-s", type=float, help="stop starting parts once this many seconds have passed "
                                                       "(a lent machine's per-command limit)")
    parser.add_argument("--probe-environment", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_environment:
        print(json.dumps(probe_environment()))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    timeouts = dict(TIMEOUTS_S)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in TIMEOUTS_S or not seconds.replace(".", "", 1).isdigit():
            parser.error(f"--timeout {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        timeouts[name] = float(seconds)
    if set(parts) - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}")
    budget = Timeouts(timeouts, args.budget_s)

    out = Path(args.out)
    logs = out.with_name(out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    started, child_env = time.monotonic(), child_environment()
    env = environment(child_env)
    gpu = bool(env.get("cuda_available")) and not args.cpu_smoke
    why_no_gpu = None if gpu else (
        "--cpu-smoke asked for the CPU-side part only" if args.cpu_smoke else
        "the environment probe failed (torch does not import?): see environment.probe_error" if "probe_error" in env
        else "no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    report = {"kiln_gpu_check": REPORT_VERSION, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": [sys.executable, *sys.argv], "mode": "gpu" if gpu else "cpu-smoke",
              "gpu_present": bool(env.get("cuda_available")), "why_no_gpu": why_no_gpu, "environment": env,
              "targets": {name: f"{c} {t}: {what}" for name, (c, t, what) in TARGETS.items()},
              "parts": {name: {"status": "pending"} if name in parts else {"status": "skipped", "why": "not in --parts"}
                        for name in PARTS}}

    def save() -> None:
        report["duration_s"] = round(time.monotonic() - started, 1)
        report["metrics"] = gpu_metrics(report["parts"], why_no_gpu)
        report["verdict"] = verdict(report["metrics"], env)
        write_json(out, report)

    save()
    for name in PARTS:
        if name not in parts:
            continue
        print(f"{name}: running (log in {logs})", flush=True)
        if name == "step":  # it takes its time limit from the budget attempt by attempt
            report["parts"][name] = run_with_fallback(name, step_commands(gpu), logs, child_env, budget)
        elif name == "fp8" and not (env.get("packages", {}).get("torchao") or {}).get("present"):
            report["parts"][name] = {"status": "unavailable",
                                     "why": "torchao is not installed (pip install 'kiln[fp8]')"}
        elif name == "fp8":
            report["parts"][name] = run_with_fallback(name, fp8_commands(gpu), logs, child_env, budget)
        elif (timeout_s := budget.for_part(name)) is None:
            report["parts"][name] = {"status": "skipped", "why": "no time left in --budget-s"}
        elif name == "tests":
            report["parts"][name] = run_tests(logs, child_env, timeout_s)
        else:
            report["parts"][name] = run_bench(name, checkpoint_command(gpu), logs, child_env, timeout_s)
        report["parts"][name]["what"] = PART_DESCRIPTIONS[name][gpu]
        save()
    print_summary(report, out)
    tests = report["parts"]["tests"]
    all_ran = all(report["parts"][name]["status"] in ("ok", "unavailable") for name in parts)
    return 0 if all_ran and not tests.get("failed") and not tests.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
