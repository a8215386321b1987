"""``kiln ckpt inspect PATH`` and ``kiln ckpt convert PATH OUT``: look into and export checkpoints.

Both run on one plain process: no torchrun, no process group, no GPU, no model built.

* ``inspect`` reads only metadata: ``kiln.json`` (step, counters, layout, versions), the
  manifest verdict (``store.verify_checkpoint``), and the torch DCP index ``.metadata``, which
  holds every tensor's *global* name, shape and dtype however the run was sharded. No tensor
  data is loaded, so it is quick on any checkpoint size (CRC32s aside: ``--no-checksums``).
* ``convert`` writes the full (unsharded) tensors into ONE ``torch.save`` or safetensors file,
  keyed by the global names megatron-core uses. It assembles each tensor from its shards with
  torch DCP's single-process load, so the TP/PP/DP layout of the saving run does not matter.
  Model tensors only by default; ``--include-optimizer`` adds the ``optimizer.*`` ones. RNG
  states and Transformer Engine ``_extra_state`` are pickled objects, not tensors: never written.

PATH is a step directory (``…/checkpoints/step_000100``), a checkpoint directory (its
``latest`` step, else its newest) or a run directory (its ``checkpoints/``). Exit code 2 when
the checkpoint is damaged (``inspect`` still prints what it can) or cannot be used.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kiln.checkpoint import store  # pure file logic; kiln.checkpoint.state imports torch, so only inside functions
from kiln.errors import KilnCheckpointError, KilnEnvironmentError

DCP_INDEX = ".metadata"  # torch DCP's index of every tensor and object in the checkpoint
OPTIMIZER_PREFIX = "optimizer."
# megatron-core chains a dense and an expert optimizer for MoE models, prefixing each one's state:
# chained_<i>.optimizer.*
_CHAINED = re.compile(r"^chained_\d+\.")
EXIT_DAMAGED = 2  # kiln.cli's exit code for a bad config, dataset or checkpoint
FORMATS = ("torch", "safetensors")


def unchained(name: str) -> str:
    """A tensor name without the ``chained_<i>.`` of the optimizer (of a chain) that saved it."""
    return _CHAINED.sub("", name, count=1)


def is_optimizer_tensor(name: str) -> bool:
    return unchained(name).startswith(OPTIMIZER_PREFIX)


@dataclass(frozen=True)
class TensorEntry:
    """One global tensor as the DCP index describes it (no data)."""

    name: str
    shape: tuple[int, ...]
    dtype: Any  # torch.dtype (torch is imported lazily: `kiln --help` and `kiln data` stay fast)

    @property
    def kind(self) -> str:
        return "optimizer" if is_optimizer_tensor(self.name) else "model"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype),
                "bytes": self.nbytes}


# -- finding the step directory ---------------------------------------------------------------
def resolve_step_dir(path: Path) -> Path:
    """The step directory PATH names: itself, or the ``latest`` (else newest) step under it."""
    if not path.exists():
        raise KilnCheckpointError(f"{path} does not exist; pass a checkpoint step directory "
                                  f"(…/checkpoints/step_000100) or a checkpoint directory holding step_* directories")
    if not path.is_dir():
        raise KilnCheckpointError(f"{path} is a file; pass the checkpoint step directory that holds it ({path.parent})")
    if looks_like_step_dir(path):
        return path
    for root in (path, path / "checkpoints"):  # a checkpoint directory, or a run directory
        steps = store.published_steps(root)
        if steps:
            latest = store.read_latest(root)
            return root / store.step_dir_name(latest if latest in steps else steps[-1])
    raise KilnCheckpointError(f"{path} holds no checkpoint (no {DCP_INDEX}, no {store.MANIFEST}, no step_* "
                              f"directories); pass a step directory or a checkpoint directory such as "
                              f"<run_dir>/checkpoints")


def looks_like_step_dir(path: Path) -> bool:
    from kiln.checkpoint.state import KILN_META

    markers = (DCP_INDEX, store.MANIFEST, KILN_META)
    return store.parse_step(path.name) is not None or any((path / name).is_file() for name in markers)


def other_steps_hint(step_dir: Path) -> str:
    """Names the step directories beside a bad one, so the message says what to use instead."""
    others = [s for s in store.published_steps(step_dir.parent) if store.step_dir_name(s) != step_dir.name]
    if not others:
        return "there is no other checkpoint beside it"
    return f"use another one, e.g. {step_dir.parent / store.step_dir_name(others[-1])}"


# -- reading metadata (no tensor data) --------------------------------------------------------
def read_dcp_index(step_dir: Path):
    """torch DCP ``Metadata`` of the checkpoint: global shapes, dtypes and chunks of every entry."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (step_dir / DCP_INDEX).is_file():
        raise KilnCheckpointError(f"{step_dir} has no {DCP_INDEX} (torch DCP index): the save never finished or it is "
                                  f"not a torch_dist checkpoint; {other_steps_hint(step_dir)}")
    try:
        return FileSystemReader(str(step_dir)).read_metadata()
    except Exception as err:  # an unpickling failure can raise almost anything
        raise KilnCheckpointError(f"{step_dir / DCP_INDEX} cannot be read ({type(err).__name__}: {err}); "
                                  f"the checkpoint is damaged; {other_steps_hint(step_dir)}") from err


def list_entries(index) -> tuple[list[TensorEntry], list[str]]:
    """(tensors, names of pickled objects) of a DCP index, in the order they were saved."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors, objects = [], []
    for name, meta in index.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            tensors.append(TensorEntry(name, tuple(meta.size), meta.properties.dtype))
        else:  # BytesStorageMetadata: RNG states, Transformer Engine _extra_state
            objects.append(name)
    return tensors, objects


def read_kiln_meta(step_dir: Path) -> dict[str, Any]:
    """``kiln.json``, or {} when it is missing or unreadable (the manifest verdict says why)."""
    from kiln.checkpoint.state import read_metadata

    try:
        return read_metadata(step_dir)
    except (KilnCheckpointError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- inspect ------------------------------------------------------------------------------------
def inspect_checkpoint(path: Path, checksums: bool = True) -> dict[str, Any]:
    """Everything ``kiln ckpt inspect`` shows, as one JSON-ready dict."""
    step_dir = resolve_step_dir(path)
    meta = read_kiln_meta(step_dir)
    verdict = store.verify_checkpoint(step_dir, checksums=checksums)
    tensors, objects, index_error = [], [], None
    try:
        tensors, objects = list_entries(read_dcp_index(step_dir))
    except KilnCheckpointError as err:  # still report the rest: it may say why (a damaged .metadata)
        index_error = str(err)
    files = [p for p in step_dir.iterdir() if p.is_file()]
    model = [t for t in tensors if t.kind == "model"]
    optimizer = [t for t in tensors if t.kind == "optimizer"]
    return {
        "checkpoint": str(step_dir),
        "step": meta.get("step", store.parse_step(step_dir.name)),
        "consumed_tokens": meta.get("parts", {}).get("trainer", {}).get("consumed_tokens"),
        "consumed_samples": meta.get("parts", {}).get("trainer", {}).get("consumed_samples"),
        "saved_at": meta.get("saved_at"),
        "imported": meta.get("imported"),
        "layout": meta.get("layout"),
        "engine": _engine(meta),
        "versions": meta.get("versions"),
        "wandb_run_id": meta.get("parts", {}).get("callback.WandbLogger", {}).get("run_id"),
        "verified": {"ok": verdict.ok, "reason": verdict.reason, "checksums": checksums},
        "files": len(files),
        "total_bytes": sum(p.stat().st_size for p in files),
        "model": {"tensors": len(model), "parameters": sum(t.numel for t in model),
                  "bytes": sum(t.nbytes for t in model)},
        "optimizer": {"tensors": len(optimizer), "bytes": sum(t.nbytes for t in optimizer)},
        "tensors": [t.as_json() for t in tensors],
        "objects": objects,
        "index_error": index_error,
    }


def format_report(report: dict[str, Any]) -> str:
    verified = report["verified"]
    checked = "sizes and CRC32s" if verified["checksums"] else "sizes only"
    verdict = f"ok ({checked})" if verified["ok"] else f"NOT OK: {verified['reason']}"
    lines = [
        f"checkpoint   {report['checkpoint']}",
        f"step         {report['step']}",
        f"consumed     {_count(report['consumed_tokens'])} tokens, {_count(report['consumed_samples'])} samples",
        f"saved at     {report['saved_at'] or '?'}",
        *([f"imported     from {report['imported'].get('from')} ({report['imported'].get('format')})"]
          if report["imported"] else []),
        f"layout       {_format_layout(report['layout'])}",
        f"engine       {report['engine']}",
        f"versions     {_format_versions(report['versions'])}",
        f"manifest     {verdict}",
        f"files        {report['files']}, {_human_bytes(report['total_bytes'])}",
        f"parameters   {'?' if report['index_error'] else format(report['model']['parameters'], ',')}",
    ]
    if report["index_error"]:
        lines.append(f"tensors      unknown: {report['index_error']}")
    for kind in ("model", "optimizer"):
        rows = [t for t in report["tensors"] if t["kind"] == kind]
        if rows:
            lines += ["", f"{kind} tensors ({len(rows)}, {_human_bytes(sum(t['bytes'] for t in rows))})"]
            lines += _format_table(rows)
    if report["objects"]:
        lines += ["", f"{len(report['objects'])} pickled objects (RNG states, Transformer Engine _extra_state; "
                      f"not tensors, never converted)"]
    return "\n".join(lines)


def _format_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = [(t["name"], _format_shape(t["shape"]), t["dtype"], _human_bytes(t["bytes"])) for t in rows]
    header = ("name", "global shape", "dtype", "size")
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(3)]
    return [f"  {a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>9}" for a, b, c, d in [header, *cells]]


def _format_shape(shape: list[int]) -> str:
    return str(tuple(shape))


def _format_layout(layout: dict[str, Any] | None) -> str:
    if not layout:
        return "?"
    parallel = " ".join(f"{k}={layout.get(k)}" for k in ("tp", "pp", "cp", "dp"))
    vpp = f" virtual_pp={layout['virtual_pp']}" if layout.get("virtual_pp") else ""
    return f"{parallel}{vpp} (world size {layout.get('world_size')})"


def _engine(meta: dict[str, Any]) -> str:
    return meta.get("engine", {}).get("description") or meta.get("config", {}).get("parallel", {}).get("engine", "?")


def _format_versions(versions: dict[str, str] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items()) if versions else "?"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(Path(args.path), checksums=not args.no_checksums)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["verified"]["ok"] and not report["index_error"] else EXIT_DAMAGED


# -- convert ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Converted:
    out: Path
    step_dir: Path
    format: str
    tensors: int
    parameters: int
    file_bytes: int


def convert_checkpoint(path: Path, out: Path, fmt: str | None = None, include_optimizer: bool = False,
                       checksums: bool = True, overwrite: bool = False) -> Converted:
    """Write the checkpoint's full tensors into one file at ``out`` (atomically)."""
    fmt = fmt or ("safetensors" if out.suffix == ".safetensors" else "torch")
    if fmt == "safetensors":
        require_safetensors()  # before minutes of loading, not after
    check_output_path(out, overwrite)
    step_dir = resolve_step_dir(path)
    tensors = load_verified_tensors(step_dir, lambda t: include_optimizer or t.kind == "model", checksums, "convert")
    meta = read_kiln_meta(step_dir)
    write_atomically(out, lambda tmp: save_tensors(tensors, tmp, fmt, provenance(step_dir, meta)))
    return Converted(out, step_dir, fmt, len(tensors), sum(t.numel() for t in tensors.values()), out.stat().st_size)


def load_verified_tensors(step_dir: Path, select: Callable[[TensorEntry], bool], checksums: bool,
                          command: str) -> dict[str, Any]:
    """The full tensors ``select`` picks, after the manifest verified and the shards proved complete."""
    verdict = store.verify_checkpoint(step_dir, checksums=checksums)
    if not verdict.ok:
        raise KilnCheckpointError(f"checkpoint {step_dir} is damaged ({verdict.reason}); {command} writes nothing "
                                  f"from a damaged checkpoint; {other_steps_hint(step_dir)}")
    index = read_dcp_index(step_dir)
    entries = [t for t in list_entries(index)[0] if select(t)]
    if not any(t.kind == "model" for t in entries):
        raise KilnCheckpointError(f"{step_dir} holds no model tensors; is it a kiln/megatron-core checkpoint?")
    check_fully_covered(index, entries, step_dir)
    return load_full_tensors(step_dir, entries)


def require_safetensors() -> None:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise KilnEnvironmentError("--format safetensors needs the safetensors package: `pip install safetensors` "
                                   "(or use --format torch)") from None


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise KilnCheckpointError(f"{out} is a directory; convert writes one file: name it, e.g. {out / 'model.pt'}")
    if out.exists() and not overwrite:
        raise KilnCheckpointError(f"{out} already exists; pass --overwrite to replace it, or choose another name")


def check_fully_covered(index, entries: list[TensorEntry], step_dir: Path) -> None:
    """Every element of each tensor must be in some shard; DCP would leave gaps uninitialized."""
    for entry in entries:
        chunks = index.state_dict_metadata[entry.name].chunks
        if sum(math.prod(chunk.sizes) for chunk in chunks) != entry.numel:
            raise KilnCheckpointError(f"{step_dir}: the shards of {entry.name} do not cover its global shape "
                                      f"{entry.shape}; the checkpoint is incomplete; {other_steps_hint(step_dir)}")


def load_full_tensors(step_dir: Path, entries: list[TensorEntry]) -> dict[str, Any]:
    """Assemble full tensors from their shards in this process (DCP reshards into our buffers)."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    tensors = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in entries}
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp_load(tensors, storage_reader=FileSystemReader(str(step_dir)), no_dist=True)
    except Exception as err:  # DCP wraps read failures in CheckpointException; name the checkpoint instead
        raise KilnCheckpointError(f"reading the tensors of {step_dir} failed ({type(err).__name__}: {err}); "
                                  f"{other_steps_hint(step_dir)}") from err
    return tensors


def provenance(step_dir: Path, meta: dict[str, Any]) -> dict[str, str]:
    """String metadata stored in a safetensors header: where the tensors came from."""
    return {"format": "pt", "kiln_checkpoint": str(step_dir.resolve()), "kiln_step": str(meta.get("step", "")),
            "kiln_consumed_tokens": str(meta.get("parts", {}).get("trainer", {}).get("consumed_tokens", ""))}


def save_tensors(tensors: dict[str, Any], path: Path, fmt: str, header: dict[str, str]) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=header)
    else:
        import torch

        torch.save(tensors, path)  # a plain {name: tensor} dict: loads with torch.load(weights_only=True)


def write_atomically(out: Path, write) -> None:
    """``write(tmp)`` beside ``out``, fsync, rename over: ``out`` is never half-written, no temp stays."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        settle_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def settle_file(path: Path) -> None:
    """The usual file mode (safetensors creates files 0600) and the data on disk before a rename."""
    os.chmod(path, 0o666 & ~current_umask())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` to write into before :func:`publish_dir` renames it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt of this same pid
    tmp.mkdir()
    return tmp


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out`` (replacing an existing ``out``): a reader sees the old
    directory or the whole new one, never a half-written one."""
    for path in tmp.rglob("*"):
        if path.is_file():
            settle_file(path)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise KilnCheckpointError(f"{out} is a file; name a directory to write into")
    if out.exists() and not overwrite:
        raise KilnCheckpointError(f"{out} already exists; pass --overwrite to replace it, or choose another directory")


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def cmd_convert(args: argparse.Namespace) -> int:
    done = convert_checkpoint(Path(args.path), Path(args.out), fmt=args.format,
                              include_optimizer=args.include_optimizer, checksums=not args.no_checksums,
                              overwrite=args.overwrite)
    print(f"wrote {done.out} ({done.format}): {done.tensors} tensors, {done.parameters:,} values, "
          f"{done.file_bytes:,} bytes ({_human_bytes(done.file_bytes)}) from {done.step_dir}")
    return 0


# -- command line -------------------------------------------------------------------------------
def add_ckpt_parser(sub) -> None:
    """Register ``kiln ckpt {inspect,convert,export,import}`` on the top-level subparsers."""
    from kiln.hf.cli import add_hf_commands

    ckpt = sub.add_parser("ckpt", help="checkpoints: inspect, convert, export/import Hugging Face Llama")
    csub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    where = ("a step directory (…/checkpoints/step_000100), or a checkpoint or run directory "
             "(then its `latest` step)")

    p = csub.add_parser("inspect", help="step, counters, layout, integrity and tensor table of a checkpoint")
    p.add_argument("path", help=where)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--no-checksums", action="store_true",
                   help="verify file sizes only, not CRC32s (fast on big checkpoints)")
    p.set_defaults(handler=cmd_inspect)

    p = csub.add_parser("convert", help="write the full model tensors into one torch or safetensors file")
    p.add_argument("path", help=where)
    p.add_argument("out", help="the file to write, e.g. model.pt or model.safetensors")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="file format (default: safetensors when OUT ends in .safetensors, else torch)")
    p.add_argument("--include-optimizer", action="store_true", help="also write the optimizer.* state tensors")
    p.add_argument("--no-checksums", action="store_true", help="verify file sizes only, not CRC32s, before converting")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(handler=cmd_convert)

    add_hf_commands(csub, where)
