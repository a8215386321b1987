"""``kiln generate`` and ``kiln eval`` (kiln.inference) on the checkpoint of a short tiny run.

The run trains configs/tiny.yaml as `make train` does (2 processes, dp=2) on the bundled corpus,
validating on the bundled dataset, for STEPS steps: enough to learn the corpus's common words
(loss ~5.2 against ln(4096) = 8.3 for a uniform guess), not enough for fluent text.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from kiln.cli import main
from kiln.inference.generate import Sampling, choose_token
from tests.kiln_run import kiln, train

STEPS = 60
PROMPT = "And God said"
GREEDY = ("--temperature", "0", "--max-new-tokens", "24")
SETTINGS = ("logging.wandb=disabled", f"train.max_steps={STEPS}", f"checkpoint.every={STEPS}", "optim.warmup_steps=10")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache) -> tuple[Path, float]:
    """(run directory, its logged val_loss at the last step)."""
    from kiln.data.bundled import ensure_bundled_dataset

    val = ensure_bundled_dataset(128, str(cache / "datasets"))  # the training data's cache entry, shared
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    metrics = train(run_dir, 2, *SETTINGS, f"data.val.path={val}", cache_dir=cache)
    (last,) = [m for m in metrics if "val_loss" in m]
    assert last["step"] == STEPS
    return run_dir, last["val_loss"]


def generate(run_dir: Path, *args: str, cache: Path) -> tuple[str, float]:
    """(printed text, mean log-likelihood of the new tokens from the log)."""
    result = kiln("generate", str(run_dir), "--prompt", PROMPT, *args, cache_dir=cache)
    (likelihood,) = re.findall(r"mean log-likelihood (-?[\d.]+)", result.stderr)
    return result.stdout.strip(), float(likelihood)


def evaluate(run_dir: Path, *args: str, cache: Path) -> dict:
    return json.loads(kiln("eval", str(run_dir), "--json", *args, cache_dir=cache).stdout)


# -- sampling rules (no model) ------------------------------------------------------------------
def test_top_k_1_is_greedy_and_a_seed_repeats_its_draws():
    logits = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    greedy = choose_token(logits, Sampling(temperature=0), torch.Generator())
    assert greedy == int(logits.argmax())
    assert choose_token(logits, Sampling(temperature=1.5, top_k=1), torch.Generator()) == greedy

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [choose_token(logits, Sampling(top_k=5), generator) for _ in range(50)]

    assert draws(3) == draws(3)
    assert set(draws(3)) <= set(torch.topk(logits, 5).indices.tolist())  # never outside the top k
    assert len(set(draws(3))) > 1  # it does sample


# -- bad inputs: exit code 2 and a message naming the fix, before anything starts ---------------
def needs_the_run(*values):
    return pytest.param(*values, marks=pytest.mark.slow)  # the run's checkpoint comes from a CLI training


@pytest.mark.parametrize("argv, message", [
    needs_the_run(["generate", "{run}", "--prompt", "x", "parallel.pp=2"], "generate runs with parallel.pp=1 cp=1"),
    needs_the_run(["eval", "{run}", "--data", "{not_data}"], "kiln data prepare"),
    (["generate", "{missing}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{missing}", "--prompt", "x"], "does not exist"),
    (["eval", "{missing}"], "does not exist"),
])
def test_bad_inputs_exit_2(request, tmp_path, capsys, argv, message):
    (tmp_path / "not_data").mkdir()
    paths = {"missing": str(tmp_path / "nothing"), "not_data": str(tmp_path / "not_data")}
    if "{run}" in argv:
        paths["run"] = str(request.getfixturevalue("run")[0])
    assert main([arg.format(**paths) for arg in argv]) == 2
    assert message in capsys.readouterr().err


# -- the CLI on the trained checkpoint ----------------------------------------------------------
@pytest.mark.slow
def test_greedy_is_the_same_under_tp1_tp2_and_top_k_1(run, cache):
    run_dir, _ = run
    text, likelihood = generate(run_dir, *GREEDY, cache=cache)
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert generate(run_dir, *GREEDY, "--nproc-per-node", "2", "parallel.tp=2", cache=cache)[0] == text
    assert generate(run_dir, "--temperature", "0.8", "--top-k", "1", "--max-new-tokens", "24", cache=cache)[0] == text


@pytest.mark.slow
def test_sampled_text_is_likely_under_the_model_and_made_of_corpus_words(run, cache):
    """Not exact text: the model prefers what it wrote far more than a uniform guess does, and the
    words it writes are (mostly) words of the corpus it was trained on."""
    from kiln.data.tokenizer import bundled_corpus_path, open_text

    text, likelihood = generate(run[0], "--seed", "1", "--max-new-tokens", "40", cache=cache)
    assert likelihood > -math.log(4096) + 2.0  # the tiny run's val loss is ~5.2 nats; uniform is 8.3
    with open_text(bundled_corpus_path()) as f:
        corpus_words = set(re.findall(r"[A-Za-z]+", f.read()))
    words = re.findall(r"[A-Za-z]+", text[len(PROMPT):])
    assert len(words) >= 5, text
    assert sum(w in corpus_words for w in words) / len(words) >= 0.7, text


@pytest.mark.slow
def test_eval_equals_training_val_loss(run, cache):
    run_dir, val_loss = run
    report = evaluate(run_dir, cache=cache)  # the run's own validation data, as training evaluated it
    assert report["step"] == STEPS
    assert report["micro_batches"] == 8 and report["tokens"] == 8 * 4 * 128  # val.batches 4 × dp 2, of 4 × 128
    assert report["loss"] == pytest.approx(val_loss, abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


@pytest.mark.slow
@pytest.mark.extended
def test_eval_under_tp2_equals_tp1(run, cache):
    run_dir, _ = run
    tp1 = evaluate(run_dir, cache=cache)
    tp2 = evaluate(run_dir, "--data", tp1["data"], "--max-batches", "8", "--nproc-per-node", "2", "parallel.tp=2",
                   cache=cache)
    assert tp2["loss"] == pytest.approx(tp1["loss"], abs=1e-5)


def transformers_val_losses(rank: int, step_dir: str, hf_dir: str) -> list[float]:
    """This data-parallel rank's validation micro-batches, as training read them, scored by transformers
    (the exported architecture: Llama, or Mixtral for an MoE run)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from kiln.checkpoint.state import read_metadata
    from kiln.config import config_from_dict
    from kiln.data.setup import build_val_batches
    from kiln.parallel.backend import destroy_parallel, init_parallel

    config = config_from_dict(read_metadata(Path(step_dir))["config"], ["train.device=cpu"])
    ctx = init_parallel("cpu", config.train.seed, config.layout)
    try:
        batches = build_val_batches(config.data, config.train, ctx)
    finally:
        destroy_parallel()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    losses = []
    with torch.no_grad():
        for batch in batches:
            tokens = batch["tokens"]
            logits = model(input_ids=tokens[:, :-1]).logits
            losses.append(float(F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())))
    return losses


@pytest.mark.slow
@pytest.mark.extended
def test_exported_checkpoint_scores_the_validation_data_in_transformers_as_kiln_eval_does(run, cache, tmp_path):
    from tests.distributed import run_distributed

    run_dir, val_loss = run
    report = evaluate(run_dir, cache=cache)
    hf_dir = tmp_path / "hf"
    kiln("ckpt", "export", str(run_dir), "--hf", str(hf_dir), "--dtype", "fp32", cache_dir=cache)
    step_dir = next((run_dir / "checkpoints").glob("step_*"))
    per_rank = run_distributed(transformers_val_losses, 2, str(step_dir), str(hf_dir))  # dp = 2, as in training
    losses = [loss for rank in per_rank for loss in rank]
    assert len(losses) == report["micro_batches"]
    assert sum(losses) / len(losses) == pytest.approx(report["loss"], abs=1e-4)
    assert report["loss"] == pytest.approx(val_loss, abs=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_eval_of_an_fsdp_checkpoint_with_the_megatron_engine_under_pp2(tmp_path, cache):
    """Any engine's checkpoint, any layout: the model tensors have the same names."""
    from kiln.data.bundled import ensure_bundled_dataset

    val = ensure_bundled_dataset(128, str(cache / "datasets"))
    metrics = train(tmp_path / "fsdp", 2, *SETTINGS[:1], "train.max_steps=10", "checkpoint.every=10",
                    "optim.warmup_steps=2", "parallel.engine=fsdp", f"data.val.path={val}", cache_dir=cache)
    report = evaluate(tmp_path / "fsdp", "--nproc-per-node", "2", "parallel.pp=2", "parallel.engine=megatron",
                      cache=cache)
    assert report["loss"] == pytest.approx(metrics[-1]["val_loss"], abs=1e-5)
