"""Pretty-printing the ``stats.json`` that `kiln data prepare` writes beside the shards."""

from __future__ import annotations


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_stats(s: dict) -> str:
    docs_in = s["documents_in"]
    lines = [
        f"inputs        {s['inputs']['files']} file(s), {s['inputs']['chunks']} chunk(s), "
        f"{_si(s['inputs']['input_bytes'])}B on disk",
        f"documents     {docs_in} in, {s['documents_after_filters']} after filters, "
        f"{s['documents_kept']} kept ({_pct(s['documents_kept'], docs_in)})",
    ]
    if s["dropped"]:
        lines.append("dropped")
        for name, n in sorted(s["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {name:<22}{n:>10}  {_pct(n, docs_in):>6}")
    lines.append(f"duplicate rate {100 * s['duplicate_rate']:.2f}% of the documents that passed the filters")
    if s["pii_replaced"]:
        lines.append("pii replaced  " + ", ".join(f"{k} {v}" for k, v in s["pii_replaced"].items()))
    if s.get("fim_documents"):
        lines.append("fim documents " + ", ".join(f"{k} {v}" for k, v in s["fim_documents"].items()))
    lines += [
        f"text          {_si(s['bytes_in'])}B in, {_si(s['bytes_kept'])}B kept",
        f"tokens        {_si(s['tokens'])} (EOS included), {s['samples']} samples of {s['seq_len']}+1, "
        f"{s['dropped_tail_tokens']} tail tokens dropped",
    ]
    run = s.get("run") or {}
    if run:
        lines.append(f"this run      {run['wall_s']:.1f}s wall, {run['chunks_processed']} chunk(s) processed, "
                     f"{run['chunks_reused']} reused; {run['mb_per_s']} MB/s, {_si(run['tokens_per_s'] or 0)} tokens/s")
    return "\n".join(lines)
