"""bench/gpu_check.py: its CPU-side part runs on a machine without a GPU, and no CPU number is ever
reported as a GPU metric (a CPU machine can never claim an MFU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.kiln_run import REPO


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def _parts(device: str, peak_flops: float | None) -> dict:
    """Bench outputs shaped like bench/step_overhead.py's and bench/checkpoint.py's --json."""
    loop = {"tokens_per_s": 50_000.0, "tflops_per_device": 440.0, "mfu": 0.45 if peak_flops else None,
            "peak_memory": {"allocated_gib": 41.5, "process_reserved_gib": 44.0} if device == "cuda" else None}
    step = {"device": device, "device_name": "NVIDIA H100 80GB HBM3", "peak_flops": peak_flops,
            "ratio_kiln_plain": 1.10, "loops": {"kiln": loop, "plain": dict(loop)}}
    checkpoint = {"device": device, "ratio_async_sync": 0.05,
                  "variants": {"async": {"blocked_s": 0.02}, "sync": {"blocked_s": 0.4}}}
    fp8 = {"device": device, "ratio_fp8_bf16": 1.3,
           "precisions": {"bf16": {"tokens_per_s": 40_000.0}, "fp8": {"tokens_per_s": 52_000.0}}}
    return {"step": {"status": "ok", "result": step}, "fp8": {"status": "ok", "result": fp8},
            "checkpoint": {"status": "ok", "result": checkpoint}, "tests": {"status": "ok"}}


def _assert_nothing_measured(metrics: dict, verdict: dict) -> None:
    assert metrics and all(m["measured"] is False and m["value"] is None and m["why_not"] for m in metrics.values())
    assert {v["status"] for v in verdict.values()} == {"not measured"}


def test_numbers_from_a_cpu_run_never_become_gpu_metrics():
    # Even if the check believed it had a GPU, a bench that ran on the CPU yields no GPU metric.
    metrics = gpu_check.gpu_metrics(_parts("cpu", peak_flops=None), why_no_gpu=None)
    _assert_nothing_measured(metrics, gpu_check.verdict(metrics, {}))
    assert "not on a CUDA GPU" in metrics["mfu"]["why_not"]
    # And without a GPU nothing is taken from the benches, whatever device they name.
    metrics = gpu_check.gpu_metrics(_parts("cuda", peak_flops=989e12), why_no_gpu="no CUDA GPU on this machine")
    _assert_nothing_measured(metrics, gpu_check.verdict(metrics, {}))


def test_gpu_results_are_judged_against_the_targets():
    metrics = gpu_check.gpu_metrics(_parts("cuda", peak_flops=989e12), why_no_gpu=None)
    assert metrics["mfu"] == {"value": 0.45, "unit": "fraction of peak dense bf16", "measured": True}
    assert metrics["peak_memory_gib"]["value"] == 41.5
    assert metrics["fp8_speedup"] == {"value": 1.3, "unit": "torchao fp8 / bf16 tokens/s", "measured": True}
    assert metrics["fp8_tokens_per_s"]["value"] == 52_000.0
    verdict = gpu_check.verdict(metrics, {})
    assert {name: v["status"] for name, v in verdict.items()} == {
        "mfu": "pass", "step_ratio": "miss", "checkpoint_stall_ratio": "pass"}


def test_a_gpu_kiln_does_not_know_gives_no_mfu_but_its_throughput():
    metrics = gpu_check.gpu_metrics(_parts("cuda", peak_flops=None), why_no_gpu=None)
    assert metrics["tflops_per_gpu"]["measured"] and metrics["tokens_per_s"]["measured"]
    assert not metrics["mfu"]["measured"] and "not known" in metrics["mfu"]["why_not"]
    assert gpu_check.verdict(metrics, {})["mfu"]["status"] == "not measured"


def test_a_failed_benchmark_is_not_measured_and_says_so():
    parts = _parts("cuda", peak_flops=989e12)
    parts["step"] = {"status": "timeout"}
    metrics = gpu_check.gpu_metrics(parts, why_no_gpu=None)
    assert not metrics["step_ratio"]["measured"] and "timeout" in metrics["step_ratio"]["why_not"]
    assert metrics["checkpoint_stall_ratio"]["measured"]


@pytest.mark.slow
@pytest.mark.extended  # the GPU check's own run on a GPU machine is what counts; here its CPU smoke
def test_cpu_side_of_the_gpu_check_runs_and_reports_no_gpu_metric(tmp_path):
    """The whole check as a user runs it, with the GPUs hidden (so it is the CPU-side part anywhere)."""
    report_path = tmp_path / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--out", str(report_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert report["mode"] == "cpu-smoke" and report["gpu_present"] is False and "no CUDA GPU" in report["why_no_gpu"]
    environment = report["environment"]
    assert environment["cuda_available"] is False and environment["gpus"] == []
    assert environment["torch"] and environment["packages"]["megatron-core"]["version"]
    assert set(environment["packages"]) >= {"deepspeed", "mosaicml-streaming", "transformer-engine", "flash-attn"}

    parts = report["parts"]
    assert list(parts) == ["step", "fp8", "checkpoint", "tests"]
    torchao = environment["packages"]["torchao"]["present"]
    assert parts.pop("fp8")["status"] == ("ok" if torchao else "unavailable")  # its CPU smoke run needs torchao
    assert all(part["status"] == "ok" for part in parts.values())
    tests = parts["tests"]
    assert tests["skipped"] >= 1 and tests["passed"] == tests["failed"] == tests["errors"] == 0
    # Every gpu-marked test, wherever it lives, was collected and skipped cleanly.
    modules = {t["test"].split("::")[0] for t in tests["tests"]}
    assert {"tests.test_gpu", "tests.test_gpu_fp8", "tests.test_attention"} <= modules
    assert all(t["outcome"] == "skipped" for t in tests["tests"])
    # The benches ran the GPU code paths shrunk onto the CPU: the 1B preset in bf16 with its
    # fp32-master plain loop, and the async and sync checkpoint saves.
    step = parts["step"]["result"]
    assert "1b" in parts["step"]["command"] and step["device"] == "cpu" and step["precision"] == "bf16"
    assert step["loops"]["kiln"]["mfu"] is None and step["loops"]["kiln"]["peak_memory"] is None
    assert parts["checkpoint"]["result"]["device"] == "cpu"
    assert set(parts["checkpoint"]["result"]["variants"]) == {"sync", "async"}

    _assert_nothing_measured(report["metrics"], report["verdict"])
    assert set(report["metrics"]) >= {"tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "step_ratio",
                                      "fp8_speedup", "checkpoint_stall_ratio"}
    assert "GPU metrics not measured" in out.stdout and "MFU —" in out.stdout
