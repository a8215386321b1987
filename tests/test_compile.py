"""kernels.compile: compiled transformer layers train like eager ones, keep their checkpoint keys, and fall
back to eager with one warning where compiling fails.

The in-process tests compile with the ``aot_eager`` backend (dynamo's trace and AOTAutograd's
forward/backward split, no inductor code generation), which is what decides graph counts, keys and
fallbacks, in seconds. The CLI tests compile with inductor, as a run does.

Loss tolerance (1e-4 relative, as the parity tests): inductor fuses the fp32 elementwise work and
reductions (RMSNorm's mean of squares, SwiGLU, the residual adds) into kernels that round in another
order, so losses differ from eager in the last bits (about 1e-7 relative at step 1 here) and Adam
carries that forward; a real error (a missing TP all-reduce, a wrong residual) moves the loss by
more than 1e-2.
"""

from __future__ import annotations

import logging

import pytest

from kiln.config import config_from_dict
from kiln.errors import KilnConfigError
from tests.distributed import run_distributed
from tests.kiln_run import PARITY_SETTINGS, assert_same_losses, train

MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
         "model.ffn_hidden_size=96", "model.vocab_size=256", "train.precision=fp32", "train.device=cpu",
         "train.global_batch_size=4", "train.micro_batch_size=4"]


def _build(tp: int = 1):
    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel

    config = config_from_dict({}, [*MODEL, f"parallel.tp={tp}"])
    ctx = init_parallel(config.train.device, config.train.seed, config.layout)

    def model():
        (built,) = build_model(config.model, config.parallel, config.train, ctx, vocab_size=256)
        return built

    return model


def _loss_and_grads(model, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (4, 65), generator=generator)
    positions = torch.arange(64).unsqueeze(0).expand(4, 64)
    model.zero_grad()
    loss = model(tokens[:, :-1], positions, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _compiled_like_eager(rank: int, tp: int):
    """Keys before/after compiling, graph counts (training, then with evaluation), and differences from eager."""
    import torch

    from kiln.kernels.compile import compile_layers

    build = _build(tp)
    eager, compiled = build(), build()  # same seed: same weights
    keys = (list(compiled.state_dict()), sorted(compiled.sharded_state_dict()))
    region = compile_layers([compiled], backend="aot_eager")
    for step in range(3):
        want_loss, want = _loss_and_grads(eager, seed=step)
        got_loss, got = _loss_and_grads(compiled, seed=step)
    worst = max(float((got[name] - want[name]).abs().max() / want[name].abs().max()) for name in want)
    after = (list(compiled.state_dict()), sorted(compiled.sharded_state_dict()))
    graphs = region.graphs
    compiled.eval()  # evaluation: no gradients, eval mode, one more graph for all layers
    with torch.no_grad():
        compiled(torch.zeros(4, 64, dtype=torch.long), torch.arange(64).unsqueeze(0).expand(4, 64))
    return keys == after, (graphs, region.graphs), region.fallback, abs(got_loss - want_loss) / want_loss, worst


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])  # tp=2: also through the CLI below
def test_compiled_layers_share_one_graph_keep_keys_and_match_eager(tp):
    for same_keys, graphs, fallback, loss_rel, grad_rel in run_distributed(_compiled_like_eager, tp, tp):
        assert fallback is None
        assert same_keys  # state_dict and sharded_state_dict: checkpoints move between compiled and eager
        assert graphs == (1, 2)  # 4 layers, 3 steps: traced once, reused (with TP: the all-reduce traced too)
        assert loss_rel < 1e-6 and grad_rel < 1e-4


def _failing_compile(rank: int, where: str):
    """Warnings logged and per-step losses of a compiled model whose compile fails, and of an eager one."""
    import torch

    from kiln.kernels import compile as kiln_compile

    records: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    kiln_compile.log.addHandler(handler)

    def backend_without_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    def refusing_compile(*args, **kwargs):
        raise RuntimeError("not supported on this platform")

    build = _build()
    eager, compiled = build(), build()
    if where == "torch.compile":  # refused up front, as on a platform torch.compile does not support
        torch.compile = refusing_compile
    region = kiln_compile.compile_layers([compiled], backend=backend_without_compiler)
    losses = [(_loss_and_grads(eager, seed=step)[0], _loss_and_grads(compiled, seed=step)[0]) for step in range(3)]
    return records, losses, [type(layer).forward is layer.forward.__func__ for layer in compiled.decoder.layers], \
        region.fallback


@pytest.mark.parametrize("where", ["first call", "torch.compile"])
def test_a_failed_compile_warns_once_and_trains_eagerly(where):
    ((warnings, losses, eager_forwards, fallback),) = run_distributed(_failing_compile, 1, where)
    assert len(warnings) == 1, warnings
    expected = "no C++ compiler found" if where == "first call" else "not supported on this platform"
    assert expected in warnings[0] and "kernels.compile=false" in warnings[0] and expected in fallback
    assert all(eager_forwards)  # every layer back on its class's forward
    for eager_loss, fallback_loss in losses:
        assert fallback_loss == eager_loss  # the failed trace ran nothing: the eager rerun is the eager step


@pytest.mark.parametrize("settings,names", [
    (["parallel.tp=2", "parallel.sequence_parallel=true"], "parallel.sequence_parallel"),
    (["train.recompute=selective"], "train.recompute=full"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=3"], "parallel.zero_stage=1 or 2"),
    (["optim.distributed_optimizer=true", "train.device=cuda"], "parallel.overlap_param_gather=false"),
])
def test_settings_that_put_untraceable_code_in_a_layer_are_config_errors(settings, names):
    with pytest.raises(KilnConfigError, match="kernels.compile") as error:
        config_from_dict({}, ["kernels.compile=true", *settings])
    assert names in str(error.value)
    config_from_dict({}, ["kernels.compile=false", *settings])  # fine without compile


# -- through the CLI, with inductor -----------------------------------------------------------------
STEPS = 5
COMMON = (f"train.max_steps={STEPS}", *PARITY_SETTINGS, "checkpoint.every=3")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kiln-cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    """Single-process runs, eager and compiled, each checkpointing at step 3."""
    out = {}
    for name, compile_ in (("eager", "false"), ("compiled", "true")):
        run_dir = tmp_path_factory.mktemp(name) / "run"
        out[name] = (run_dir, train(run_dir, 1, *COMMON, f"kernels.compile={compile_}", cache_dir=cache_dir))
    return out


@pytest.mark.slow  # trains through the CLI
def test_compiled_run_has_the_eager_losses(runs):
    (_, eager), (_, compiled) = runs["eager"], runs["compiled"]
    assert_same_losses(eager, compiled, STEPS)
    print(f"\nfirst step (tiny model, 2 layers): compiled {compiled[0]['step_time_s']:.2f} s, "
          f"eager {eager[0]['step_time_s']:.2f} s; later steps {compiled[-1]['step_time_s'] * 1000:.0f} ms "
          f"vs {eager[-1]['step_time_s'] * 1000:.0f} ms")


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [("compiled", "eager"), pytest.param("eager", "compiled", marks=pytest.mark.extended)])
def test_a_checkpoint_continues_with_and_without_compile(runs, tmp_path, cache_dir, saved, resumed):
    saved_dir, _ = runs[saved]
    _, reference = runs["eager"]
    metrics = train(tmp_path / "run", 1, *COMMON, f"kernels.compile={str(resumed == 'compiled').lower()}",
                    f"checkpoint.resume_from={saved_dir / 'checkpoints' / 'step_000003'}", cache_dir=cache_dir)
    assert_same_losses(reference, metrics, STEPS, first_step=4)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [
    pytest.param(2, ("parallel.tp=2",), id="tp2"),
    # dp=2; on GPUs the overlapped parameter gather would put DDP's hooks inside the layers (a config error)
    pytest.param(2, ("optim.distributed_optimizer=true", "parallel.overlap_param_gather=false"), id="dp2",
                 marks=pytest.mark.extended),
    pytest.param(2, ("parallel.pp=2",), id="pp2", marks=pytest.mark.extended),
    # the first pass without gradients: a second graph
    pytest.param(1, ("train.recompute=full",), id="full-recompute", marks=pytest.mark.extended),
    pytest.param(2, ("parallel.engine=fsdp",), id="fsdp", marks=pytest.mark.extended),  # FSDP2's hooks
    pytest.param(2, ("parallel.engine=deepspeed", "parallel.zero_stage=2"), id="deepspeed-zero2",
                 marks=pytest.mark.extended),
])
def test_compiled_layouts_have_the_single_process_losses(runs, tmp_path, cache_dir, nproc, layout):
    _, reference = runs["eager"]
    metrics = train(tmp_path / "run", nproc, *COMMON, "kernels.compile=true", *layout, cache_dir=cache_dir)
    assert_same_losses(reference, metrics, STEPS)
