"""The package's shape, held by tests: what may talk to which layer.

* Only ``kiln/parallel/`` reads megatron-core's ``parallel_state`` globals (everything else gets
  its process groups from the parallel context).
* Only ``kiln/parallel/`` calls ``torch.distributed`` collectives; the rest goes through
  ``kiln.parallel.collectives``, which builds tensors on the run's device (NCCL rejects CPU tensors).
* Only ``kiln/engine/`` compares engine names; everything else asks the engine.

Each rule is checked on every module of the package, and each checker is first shown to catch
a violation, so a broken checker cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kiln.engine import ENGINES
from tests.kiln_run import REPO

PACKAGE = REPO / "kiln"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "barrier", "monitored_barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object",
    "scatter", "scatter_object_list", "send", "recv", "isend", "irecv", "all_to_all", "all_to_all_single",
    "batch_isend_irecv",
}


def modules_outside(folder: str) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(PACKAGE / folder))


def parallel_state_imports(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.endswith("parallel_state") or (
                    node.module.startswith("megatron") and any(a.name == "parallel_state" for a in node.names)):
                lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.endswith(".parallel_state") for a in node.names):
            lines.append(node.lineno)
    return lines


def direct_collectives(tree: ast.AST) -> list[int]:
    """Calls like ``dist.all_reduce(...)`` / ``torch.distributed.barrier()``, and imported collectives."""
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            lines += [node.lineno for a in node.names if a.name in COLLECTIVES]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                lines.append(node.lineno)
    return lines


def engine_name_comparisons(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for operand in operands:
                values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in ENGINES for v in values):
                    lines.append(node.lineno)
    return lines


RULES = {
    "imports megatron's parallel_state": ("parallel", parallel_state_imports,
                                          "from megatron.core import parallel_state\n"),
    "calls a torch.distributed collective": ("parallel", direct_collectives,
                                             "import torch.distributed as dist\ndist.all_reduce(x)\n"),
    "compares an engine name": ("engine", engine_name_comparisons, "if config.parallel.engine == 'deepspeed': pass\n"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_checker_catches_a_violation(rule):
    _, checker, bad = RULES[rule]
    assert checker(ast.parse(bad)) == [len(bad.splitlines())]


@pytest.mark.parametrize("rule", list(RULES))
def test_only_the_owning_folder_does_it(rule):
    folder, checker, _ = RULES[rule]
    modules = modules_outside(folder)
    assert len(modules) > 20  # the package is there and the scan reads it
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in modules
                 for line in checker(ast.parse(path.read_text()))]
    assert not offenders, f"outside kiln/{folder}/, these {rule}: {offenders}"
