"""Every attention backend agrees with the plain reference: causal, grouped-query, document
masks; outputs and gradients. Context-parallel ring attention on gloo agrees with it too."""

from __future__ import annotations

import types

import pytest
import torch

from kiln.errors import KilnConfigError
from kiln.kernels.attention import KilnAttention, backend_missing, choose_backend, reference_attention
from kiln.kernels.documents import cumulative_lengths, document_map, document_positions
from kiln.kernels.ring_attention import local_positions, split_for_context_parallel
from tests.distributed import run_distributed

EOS = 0
SEQ, BATCH, HEADS, KV_HEADS, DIM = 32, 2, 4, 2, 8


def _inputs(seed: int, documents: bool, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(SEQ, BATCH, heads, DIM, generator=generator, dtype=dtype)
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    docs = None
    if documents:
        tokens = torch.randint(1, 50, (BATCH, SEQ), generator=generator)
        tokens[0, [5, 6, 20]] = EOS  # a one-token document between two others
        tokens[1, [SEQ - 1]] = EOS  # the second sample is a single document
        docs = document_map(tokens, EOS)
    return q, k, v, docs


def _module(backend: str) -> KilnAttention:
    from megatron.core.transformer.enums import AttnMaskType

    config = types.SimpleNamespace(attention_dropout=0.0, kv_channels=DIM, context_parallel_size=1)
    return KilnAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                         backend=backend)


def _forward_and_grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    return out.detach(), [t.grad for t in (q, k, v)]


def test_document_map_and_positions():
    tokens = torch.tensor([[7, 8, EOS, 9, EOS, EOS, 3, 4]])
    docs = document_map(tokens, EOS)
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]  # an eos ends its own document
    assert document_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    cu, longest = cumulative_lengths(torch.cat([docs, docs]))
    assert cu.tolist() == [0, 3, 5, 6, 8, 11, 13, 14, 16] and longest == 3


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash", "te"])
def test_backend_matches_reference(backend, documents):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    missing = backend_missing(backend, device)
    forward_only = backend == "flex" and device == "cpu"  # PyTorch has no CPU backward for flex
    if missing and not forward_only:
        pytest.skip(missing)
    if backend == "te":
        pytest.skip("te is checked inside a built model (tests/test_gpu.py): it needs megatron's TE config")
    q, k, v, docs = _inputs(0, documents)
    module = _module(backend)

    def run(q, k, v):
        return module(q, k, v, docs)

    def reference(q, k, v):
        return reference_attention(q, k, v, docs, DIM ** -0.5)

    if forward_only:
        with torch.no_grad():
            torch.testing.assert_close(run(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
        return
    out, grads = _forward_and_grads(run, q, k, v)
    ref_out, ref_grads = _forward_and_grads(reference, q, k, v)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, ref_grads, "qkv"):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_masked_attention_ignores_other_documents():
    q, k, v, docs = _inputs(1, documents=True)
    out = reference_attention(q, k, v, docs, DIM ** -0.5)
    changed = v.clone()
    changed[:5, 0] += 10.0  # the first document of sample 0 (tokens 0-5, with its eos)
    out_changed = reference_attention(q, k, changed, docs, DIM ** -0.5)
    assert not torch.allclose(out[:6, 0], out_changed[:6, 0])
    torch.testing.assert_close(out[7:, 0], out_changed[7:, 0])  # later documents never saw it


def test_backend_choice():
    assert choose_backend("auto", "cpu", documents=True, cp=1) == "sdpa"
    assert choose_backend("sdpa", "cpu", documents=False, cp=2) == "sdpa"
    for backend, words in [("flash", "NVIDIA GPUs"), ("te", "NVIDIA GPUs"), ("flex", "no CPU backward")]:
        with pytest.raises(KilnConfigError, match=words):
            choose_backend(backend, "cpu", documents=False, cp=1)


def test_backend_choice_on_a_gpu(monkeypatch):
    from kiln.kernels import attention

    present = {"te": False, "flash": True, "flex": True, "sdpa": True}
    monkeypatch.setattr(attention, "backend_missing", lambda name, device: None if present[name] else "absent")
    assert choose_backend("auto", "cuda", documents=False, cp=1) == "flash"
    assert choose_backend("auto", "cuda", documents=True, cp=1, precision="fp32") == "flex"  # flash: half only
    with pytest.raises(KilnConfigError, match="bf16/fp16 only"):
        choose_backend("flash", "cuda", documents=False, cp=1, precision="fp32")
    present["te"] = True
    assert choose_backend("auto", "cuda", documents=False, cp=2) == "te"
    assert choose_backend("auto", "cuda", documents=True, cp=2) == "flash"  # TE's CP does not take kiln's documents
    with pytest.raises(KilnConfigError, match="kiln's ring attention masks documents"):
        choose_backend("te", "cuda", documents=True, cp=2)


def test_context_parallel_chunks_balance_causal_work():
    # 2·cp chunks of 4 tokens; rank r holds chunks r and 2·cp−1−r.
    assert local_positions(8, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(8, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    whole = torch.arange(16).view(1, 16)
    assert split_for_context_parallel(whole, 1, 2).tolist() == [local_positions(8, 1, 2).tolist()]
    work = [int(sum(p + 1 for p in local_positions(8, r, 2).tolist())) for r in range(2)]
    assert work[0] == work[1]  # keys attended under the causal mask: the same on both ranks


def _ring_rank(rank: int, cp: int, documents: bool, dtype_name: str, kernel: str):
    import torch.distributed as dist

    from kiln.kernels import ring_attention as ring
    from kiln.kernels.ring_attention import ring_attention

    ring.FUSED_CPU_KERNEL = kernel == "fused"

    dist.init_process_group("gloo")
    dtype = getattr(torch, dtype_name)
    q, k, v, docs = _inputs(2, documents, dtype)
    local = [split_for_context_parallel(t, rank, cp, dim=0) for t in (q, k, v)]
    grad = torch.cos(torch.arange(q.numel(), dtype=torch.float32)).view(SEQ, BATCH, -1).to(dtype)
    local = [t.clone().requires_grad_() for t in local]
    out = ring_attention(*local, docs, DIM ** -0.5, dist.group.WORLD)
    out.backward(split_for_context_parallel(grad, rank, cp, dim=0))
    dist.destroy_process_group()
    # numpy, not tensors: a tensor crosses the result queue as shared memory owned by this process
    return out.detach().float().numpy(), [t.grad.float().numpy() for t in local]


@pytest.mark.parametrize("cp,documents,dtype,kernel", [
    (2, False, "float32", "fused"), (2, True, "float32", "fused"),
    pytest.param(4, True, "float32", "fused", marks=pytest.mark.extended),
    pytest.param(4, False, "float32", "fused", marks=pytest.mark.extended),
    pytest.param(2, True, "bfloat16", "fused", marks=pytest.mark.extended),
    # The portable block kernel GPUs use without TE, checked here on CPU.
    (2, True, "float32", "math"),
    pytest.param(4, False, "float32", "math", marks=pytest.mark.extended),
])
def test_ring_attention_matches_reference(cp, documents, dtype, kernel):
    results = run_distributed(_ring_rank, cp, cp, documents, dtype, kernel)
    q, k, v, docs = _inputs(2, documents, getattr(torch, dtype))
    q, k, v = (t.float() for t in (q, k, v))
    ref_out, ref_grads = _forward_and_grads(lambda *a: reference_attention(*a, docs, DIM ** -0.5), q, k, v)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2)
    for rank, (out, grads) in enumerate(results):
        out, grads = torch.from_numpy(out), [torch.from_numpy(g) for g in grads]
        torch.testing.assert_close(out, split_for_context_parallel(ref_out, rank, cp, dim=0), **tol)
        for got, want, name in zip(grads, ref_grads, "qkv"):
            torch.testing.assert_close(got, split_for_context_parallel(want, rank, cp, dim=0), **tol,
                                       msg=f"rank {rank} d{name}")


def test_cli_refuses_an_absent_backend_before_launch(tmp_path):
    from tests.kiln_run import kiln

    result = kiln("train", "configs/tiny.yaml", "--nproc-per-node", "2", "train.device=cpu", "kernels.attention=flash",
                  f"train.run_dir={tmp_path / 'run'}", check=False, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "kernels.attention=flash runs on NVIDIA GPUs" in result.stderr
    assert not (tmp_path / "run").exists()  # no worker started, nothing written


def test_dry_run_reports_context_parallel_chunks():
    from kiln.config import config_from_dict

    config = config_from_dict({}, ["parallel.cp=2", "data.reset_attention_at_eos=true"])
    report = config.dry_run_report(2, vocab_size=4096)
    assert "document masks" in report
    assert "each cp rank holds 2 chunks of 32 tokens (64 of 128 per sequence)" in report


def _ring_on_one_gpu(rank: int):
    import torch.distributed as dist

    from kiln.kernels.ring_attention import ring_attention

    dist.init_process_group("nccl")
    q, k, v, docs = (t.cuda() if t is not None else None for t in _inputs(3, documents=True))
    out, grads = _forward_and_grads(lambda *a: ring_attention(*a, docs, DIM ** -0.5, dist.group.WORLD), q, k, v)
    ref, ref_grads = _forward_and_grads(lambda *a: reference_attention(*a, docs, DIM ** -0.5), q, k, v)
    dist.destroy_process_group()
    return [float((a - b).abs().max()) for a, b in zip([out, *grads], [ref, *ref_grads])]


@pytest.mark.gpu
def test_ring_block_kernel_on_a_gpu():
    """The portable block kernel on CUDA (a ring of one: every part is local)."""
    errors = run_distributed(_ring_on_one_gpu, 1)[0]
    assert max(errors) < 1e-4, errors
