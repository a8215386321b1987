"""Attention forward+backward time of every backend present, relative to SDPA, and of
context-parallel ring attention (CP=2, two gloo/NCCL processes) relative to one process on the
same total sequence, all measured in the same run.

Each variant is kiln's core attention module (kiln.kernels.attention) on the same queries,
keys and values ([s, b, heads, d], grouped-query), causal and with document masks (documents
of ``--doc-len`` tokens on average). Times are medians of ``--repeats`` timed calls after
warm-up; for CP the time of a call is the slowest rank's.

    python bench/attention.py                          # CPU: seq 2048, 8 heads / 4 kv heads, d 64
    python bench/attention.py --device cuda --seq 8192 --batch 2 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kiln.kernels.attention import BACKENDS, KilnAttention, backend_missing, reference_attention  # noqa: E402
from kiln.kernels.documents import document_map  # noqa: E402


def make_inputs(args, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(args.seq, args.batch, heads, args.head_dim, generator=generator).to(device, dtype)
               for heads in (args.heads, args.kv_heads, args.kv_heads))
    tokens = (torch.rand(args.batch, args.seq, generator=generator) < 1 / args.doc_len).long()  # 1 marks an eos
    return q, k, v, document_map(tokens, 1).to(device)


def module(args, backend: str, cp: int = 1, cp_group=None) -> KilnAttention:
    from megatron.core.transformer.enums import AttnMaskType

    config = types.SimpleNamespace(attention_dropout=0.0, kv_channels=args.head_dim, context_parallel_size=cp)
    pg = types.SimpleNamespace(cp=cp_group) if cp_group is not None else None
    return KilnAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pg, backend=backend)


def time_call(fn, args, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        fn()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(attend, q, k, v, documents):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    def run():
        out = attend(q, k, v, documents)
        out.float().sum().backward()

    return run


def backend_times(args, device) -> dict[str, dict[str, float]]:
    q, k, v, docs = make_inputs(args, device)
    scale = args.head_dim ** -0.5
    variants = {name: module(args, name) for name in BACKENDS
                if name != "te" and backend_missing(name, device.type) is None}
    variants["reference (plain PyTorch)"] = lambda q, k, v, d: reference_attention(q, k, v, d, scale)
    results = {}
    for masking, documents in (("causal", None), ("documents", docs)):
        results[masking] = {name: time_call(forward_backward(attend, q, k, v, documents), args, device)
                            for name, attend in variants.items()}
    return results


def _cp_worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist

    from kiln.kernels.ring_attention import split_for_context_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    q, k, v, docs = make_inputs(args, device)
    local = [split_for_context_parallel(t, rank, world, dim=0) for t in (q, k, v)]
    attention = module(args, "sdpa", cp=world, cp_group=dist.group.WORLD)
    timings = {}
    for masking, documents in (("causal", None), ("documents", docs)):
        run = forward_backward(attention, *local, documents)

        def call():
            run()
            dist.barrier()  # a call ends when the slowest rank is done

        timings[masking] = time_call(call, args, device)
    queue.put((rank, timings))
    dist.destroy_process_group()


def ring_times(args) -> dict[str, float]:
    import multiprocessing as mp

    from kiln.parallel.backend import free_port

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    workers = [context.Process(target=_cp_worker, args=(rank, 2, port, args, queue)) for rank in range(2)]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join()
    return max(results)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--doc-len", type=int, default=256, help="mean document length for the masked runs")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (CP=1 and each CP rank)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    single = backend_times(args, device)
    ring = ring_times(args)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "seq": args.seq,
              "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "dtype": args.dtype, "threads_per_process": args.threads, "results": {}}
    for masking in ("causal", "documents"):
        base = single[masking]["sdpa"]
        rows = {name: {"seconds": t, "vs_sdpa": t / base} for name, t in single[masking].items()}
        rows["ring cp=2 (sdpa module, 2 processes)"] = {"seconds": ring[masking], "vs_sdpa": ring[masking] / base}
        report["results"][masking] = rows
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"attention forward+backward, {report['device']}, seq {args.seq}, batch {args.batch}, "
          f"{args.heads}/{args.kv_heads} heads, d {args.head_dim}, {args.dtype}, {args.threads} thread(s) per process")
    for masking, rows in report["results"].items():
        print(f"  {masking}:")
        for name, row in rows.items():
            print(f"    {name:<40} {row['seconds'] * 1e3:9.1f} ms   {row['vs_sdpa']:6.2f}× sdpa")


if __name__ == "__main__":
    main()
