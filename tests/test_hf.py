"""Hugging Face Llama ↔ kiln: the name/layout mapping, logits parity, `kiln ckpt export --hf` and
`kiln ckpt import --hf` (round trip through a TP=2 checkpoint, resumed training, errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kiln.errors import KilnConfigError
from kiln.hf import llama
from tests.distributed import run_distributed

# configs/tiny.yaml's model: 2 layers, hidden 64, 4 heads, 2 kv heads, ffn 256; the bundled tokenizer's
# 4096 tokens, whose <|endoftext|> (id 0) is kiln's EOS.
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, vocab_size=4096, max_position_embeddings=128, rope_theta=10000.0,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


def random_llama(tie: bool = False, seed: int = 0, **changes):
    """A small random ``LlamaForCausalLM``."""
    return random_hf_model("Llama", {**TINY_LLAMA, **changes, "tie_word_embeddings": tie}, seed)


def random_hf_model(family: str, settings: dict, seed: int):
    """A random transformers ``<family>ForCausalLM`` (fp32, eager attention), norms not all ones."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, f"{family}Config")(**settings, attn_implementation="eager", torch_dtype="float32")
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # so a swapped or missed norm shows in the logits
    return model


def shape_of(config) -> llama.LlamaShape:
    return llama.LlamaShape(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                            config.num_key_value_heads, config.intermediate_size, config.vocab_size,
                            config.tie_word_embeddings)


# -- the mapping --------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4, 1])
def test_mapping_round_trips_every_tensor(tie, kv_heads):
    shape = llama.LlamaShape(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=kv_heads, ffn_hidden_size=96,
                             vocab_size=1000, tie_embeddings=tie)
    generator = torch.Generator().manual_seed(kv_heads)
    hf = {name: torch.randn(_hf_shape(name, shape), generator=generator) for name in llama.hf_names(shape)}
    kiln = llama.hf_to_kiln(hf, shape, padded_vocab=1024)
    assert kiln["embedding.word_embeddings.weight"].shape == (1024, 64)
    assert torch.equal(kiln["embedding.word_embeddings.weight"][1000:], torch.zeros(24, 64))
    assert kiln["decoder.layers.self_attention.linear_qkv.weight"].shape == (2, (4 + 2 * kv_heads) * 16, 64)
    assert ("output_layer.weight" in kiln) == (not tie)
    back = llama.kiln_to_hf(kiln, shape)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[name], hf[name]) for name in hf)


def test_fused_qkv_rows_are_grouped_per_query_group():
    """megatron-core's order: group g holds its query heads, then its key head, then its value head."""
    shape = llama.LlamaShape(1, 8, num_heads=4, num_kv_heads=2, ffn_hidden_size=8, vocab_size=8, tie_embeddings=False)
    head = torch.arange(4).repeat_interleave(2).unsqueeze(1).float()  # row r belongs to head r // 2
    qkv = llama.fuse_qkv(head, 10 + head[:4], 20 + head[:4], shape)
    assert qkv[:, 0].tolist() == [0, 0, 1, 1, 10, 10, 20, 20, 2, 2, 3, 3, 11, 11, 21, 21]


def test_per_layer_and_local_spec_norm_names_export_too():
    shape = llama.LlamaShape(1, 8, 2, 1, 16, 8, True)
    stacked = llama.hf_to_kiln({name: torch.randn(_hf_shape(name, shape)) for name in llama.hf_names(shape)}, shape, 8)
    per_layer = {name.replace("decoder.layers.", "decoder.layers.0."): value[0] if name.startswith("decoder.layers.")
                 else value for name, value in stacked.items()}
    norm = per_layer.pop("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
    per_layer["decoder.layers.0.input_layernorm.weight"] = norm
    assert torch.equal(llama.kiln_to_hf(per_layer, shape)["model.layers.0.input_layernorm.weight"], norm)


def test_unknown_tensors_are_refused_both_ways():
    shape = llama.LlamaShape(1, 8, 2, 1, 16, 8, False)
    hf = {name: torch.randn(_hf_shape(name, shape)) for name in llama.hf_names(shape)}
    with pytest.raises(KilnConfigError, match="unexpected model.layers.0.self_attn.q_proj.bias"):
        llama.hf_to_kiln({**hf, "model.layers.0.self_attn.q_proj.bias": torch.zeros(8)}, shape, 8)
    kiln = llama.hf_to_kiln(hf, shape, 8)
    from kiln.errors import KilnCheckpointError

    with pytest.raises(KilnCheckpointError, match="mlp.router.weight"):
        llama.kiln_to_hf({**kiln, "decoder.layers.mlp.router.weight": torch.zeros(1, 4, 8)}, shape)


def _hf_shape(name: str, shape: llama.LlamaShape) -> tuple[int, ...]:
    h, d, f = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    sizes = {"q_proj": (shape.num_heads * d, h), "k_proj": (shape.num_kv_heads * d, h),
             "v_proj": (shape.num_kv_heads * d, h), "o_proj": (h, shape.num_heads * d), "gate_proj": (f, h),
             "up_proj": (f, h), "down_proj": (h, f), "embed_tokens": (shape.vocab_size, h),
             "lm_head": (shape.vocab_size, h)}
    for key, size in sizes.items():
        if f".{key}." in f".{name}":
            return size
    return (h,)  # the norms


def test_hf_config_refusals_name_the_setting():
    good = {**TINY_LLAMA, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert llama.model_section_from_hf(good, "x")["num_query_groups"] == 2
    for bad, words in [({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "kiln imports only Llama"),
                       ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
                       ({"attention_bias": True}, "attention_bias true"),
                       ({"mlp_bias": True}, "mlp_bias true"),
                       ({"head_dim": 32}, "head_dim 32")]:
        with pytest.raises(KilnConfigError, match=words):
            llama.model_section_from_hf({**good, **bad}, "x")


# -- logits parity ------------------------------------------------------------------------------
def kiln_logits_of_hf(rank: int, cases: list[tuple[str, torch.Tensor]], overrides: tuple[str, ...] = ()) -> list:
    """For each (HF directory, tokens): kiln's model (TP=1 unless ``overrides`` say otherwise, CPU) built for its
    config.json with the HF weights filled in, and its logits on the tokens (numpy: pickled by value, not by
    shared memory)."""
    from kiln.config import config_from_dict
    from kiln.hf import families
    from kiln.hf.weights import HFWeights, fill_model_parts
    from kiln.model.builder import build_model
    from kiln.parallel.backend import init_parallel
    from kiln.plan.params import padded_vocab_size

    ctx = None
    logits = []
    for hf_dir, tokens in cases:
        hf_config = json.loads((Path(hf_dir) / "config.json").read_text())
        family = families.of_hf_config(hf_config)
        model = family.model_section_from_hf(hf_config, hf_dir)
        config = config_from_dict({"model": model}, ["train.precision=fp32", "train.device=cpu", *overrides])
        ctx = ctx or init_parallel("cpu", 0, config.layout)
        (part,) = build_model(config.model, config.parallel, config.train, ctx, model["vocab_size"])
        shape = family.shape_of(config.model, config.model.vocab_size)
        fill_model_parts([part], HFWeights(Path(hf_dir)), shape, padded_vocab_size(shape.vocab_size, config.model))
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        with torch.no_grad():
            logits.append(part.eval()(tokens, positions)[..., : shape.vocab_size].numpy())
    return logits


def test_imported_weights_give_the_hf_logits(tmp_path):
    """Untied with GQA (2 kv heads), tied without (4), and multi-query (1); vocab 1000 padded to 1024."""
    cases, want = [], []
    for tie, kv_heads in [(False, 2), (True, 4), (False, 1)]:
        hf = random_llama(tie=tie, num_key_value_heads=kv_heads, vocab_size=1000, seed=kv_heads)
        hf.save_pretrained(tmp_path / f"{tie}-{kv_heads}")
        tokens = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(kv_heads))
        with torch.no_grad():
            want.append(hf(tokens).logits)
        cases.append((str(tmp_path / f"{tie}-{kv_heads}"), tokens))
    (got,) = run_distributed(kiln_logits_of_hf, 1, cases)
    for case, expected, logits in zip(cases, want, got):
        assert logits.shape == expected.shape
        assert (torch.from_numpy(logits) - expected).abs().max() < 1e-4, case[0]


# -- the commands -------------------------------------------------------------------------------
def kiln_here(capsys, *args: str) -> tuple[int, str, str]:
    """`kiln ARGS` in this process (one-process commands: no second torch import)."""
    from kiln.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """configs/tiny.yaml's model as a random HF Llama, its final norm zero: every logit is 0, so its loss
    on any batch is ln(4096), which a run resumed from its import must show at step 1."""
    model = random_llama(seed=3)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> Path:
    """`kiln ckpt import --hf DIR OUT parallel.tp=2 --nproc-per-node 2`: two TP ranks fill their halves."""
    from tests.kiln_run import kiln

    out = tmp_path_factory.mktemp("imported") / "ckpt"
    kiln("ckpt", "import", "--hf", str(hf_dir), str(out), "parallel.tp=2", "--nproc-per-node", "2")
    return out


@pytest.fixture(scope="module")
def resumed(imported, tmp_path_factory) -> Path:
    """Two steps of configs/tiny.yaml (bundled data, one process without torchrun) from the imported checkpoint."""
    from tests.kiln_run import TINY, kiln

    base = tmp_path_factory.mktemp("resumed")
    kiln("train", TINY, "--resume-from", str(imported), f"train.run_dir={base / 'run'}", "train.max_steps=2",
         "checkpoint.every=2", "logging.wandb=disabled", "train.global_batch_size=4", "train.log_every=1",
         cache_dir=base / "cache")
    return base / "run"


@pytest.mark.slow
def test_hf_to_tp2_checkpoint_to_hf_is_exact(hf_dir, imported, tmp_path, capsys):
    meta = json.loads((imported / "step_000000" / "kiln.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["step"] == 0 and meta["imported"]["format"] == "hf-llama"
    assert set(meta["parts"]) == {"trainer"}  # no data position: a resumed run starts at its own sample 0
    code, out, _ = kiln_here(capsys, "ckpt", "inspect", str(imported))
    assert code == 0 and f"imported     from {hf_dir} (hf-llama)" in out.splitlines()
    code, out, _ = kiln_here(capsys, "ckpt", "export", str(imported), "--hf", str(tmp_path / "back"))
    assert code == 0 and "in fp32" in out
    want, got = read_safetensors(hf_dir), read_safetensors(tmp_path / "back")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    source = json.loads((hf_dir / "config.json").read_text())
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    shared = (source.keys() & exported.keys()) - {"torch_dtype", "dtype", "transformers_version"}
    assert {"hidden_size", "num_key_value_heads", "intermediate_size", "rope_theta", "rms_norm_eps", "vocab_size",
            "tie_word_embeddings", "max_position_embeddings", "head_dim"} <= shared
    assert {key: exported[key] for key in shared} == {key: source[key] for key in shared}


@pytest.mark.slow
def test_training_resumes_from_the_import_at_step_0_with_the_hf_weights(resumed):
    import math

    from tests.kiln_run import read_metrics

    metrics = read_metrics(resumed)
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[0]["loss"] == pytest.approx(math.log(4096), rel=1e-5)  # the HF model's loss on any batch
    meta = json.loads((resumed / "checkpoints" / "step_000002" / "kiln.json").read_text())
    assert meta["parts"]["trainer"]["consumed_samples"] == 8  # from sample 0: 2 steps × 4


@pytest.mark.slow
def test_export_of_a_trained_checkpoint_loads_in_transformers(resumed, tmp_path, capsys):
    import transformers

    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert kiln_here(capsys, "ckpt", "export", str(resumed), "--hf", str(whole))[0] == 0
    assert kiln_here(capsys, "ckpt", "export", str(resumed), "--hf", str(sharded), "--max-shard-size", "300KB",
                     "--dtype", "bf16")[0] == 0
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) == 2 * 9 + 3
    assert len(list(sharded.glob("model-0000?-of-0000?.safetensors"))) > 2
    model = transformers.LlamaForCausalLM.from_pretrained(whole)
    halves = transformers.LlamaForCausalLM.from_pretrained(sharded)
    assert {t.dtype for t in read_safetensors(sharded).values()} == {torch.bfloat16}
    assert json.loads((sharded / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for (name, value), (_, half) in zip(model.state_dict().items(), halves.state_dict().items()):
        assert torch.equal(value.to(torch.bfloat16), half.to(torch.bfloat16)), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(whole)
    ids = tokenizer("kiln bakes models", return_tensors="pt")
    from kiln.data.tokenizer import bundled_tokenizer_path, load_tokenizer

    assert ids["input_ids"][0].tolist() == load_tokenizer(bundled_tokenizer_path()).encode("kiln bakes models")
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    with torch.no_grad():
        assert torch.isfinite(model(**ids).logits).all()


@pytest.mark.slow
@pytest.mark.extended
def test_one_process_import_for_a_config_and_the_fsdp_engine_exports_back_exactly(hf_dir, tmp_path, capsys):
    """CONFIG (unset ffn size and vocab: derived, equal to the HF model's), no torchrun, the fsdp
    engine's own (portable) checkpoint format."""
    from tests.kiln_run import kiln

    out = tmp_path / "fsdp"
    kiln("ckpt", "import", "--hf", str(hf_dir), str(out), "configs/tiny.yaml", "parallel.engine=fsdp")
    meta = json.loads((out / "step_000000" / "kiln.json").read_text())
    assert meta["engine"]["checkpoint_format"] == "portable" and meta["config"]["model"]["ffn_hidden_size"] is None
    assert kiln_here(capsys, "ckpt", "export", str(out), "--hf", str(tmp_path / "back"))[0] == 0
    want, got = read_safetensors(hf_dir), read_safetensors(tmp_path / "back")
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("layout", [("parallel.pp=2",), ("parallel.tp=2", "parallel.engine=deepspeed"),
                                    ("parallel.engine=deepspeed", "parallel.zero_stage=3")])
def test_tied_model_round_trips_through_more_layouts_and_engines(layout, tmp_path, capsys):
    """Pipeline stages (the last one's tied output layer), DeepSpeed over TP, ZeRO-3 over DP=2."""
    from tests.kiln_run import kiln

    random_llama(tie=True, seed=5).save_pretrained(tmp_path / "hf")
    kiln("ckpt", "import", "--hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), *layout, "--nproc-per-node", "2")
    assert kiln_here(capsys, "ckpt", "export", str(tmp_path / "ckpt"), "--hf", str(tmp_path / "back"))[0] == 0
    want, got = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "back")
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)


def test_export_takes_the_fp32_master_weights_where_a_checkpoint_keeps_them(tmp_path):
    """A bf16 run's checkpoint: bf16 working weights, fp32 masters (optimizer.state.fp32_param.*)."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from kiln.checkpoint import store
    from kiln.hf.export import exported_weights

    master = torch.randn(8, 4, dtype=torch.float32)
    state = {"output_layer.weight": master.to(torch.bfloat16), "decoder.final_layernorm.weight": torch.ones(4),
             "optimizer.state.fp32_param.output_layer.weight": master,
             "optimizer.state.exp_avg.output_layer.weight": torch.zeros(8, 4)}
    save(state, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True)
    store.write_manifest(tmp_path, 2, store.describe_files(tmp_path, sorted(p.name for p in tmp_path.iterdir())))
    weights = exported_weights(tmp_path, checksums=True)
    assert weights.keys() == {"output_layer.weight", "decoder.final_layernorm.weight"}
    assert weights["output_layer.weight"].dtype == torch.float32 and torch.equal(weights["output_layer.weight"], master)


def test_refuses_an_existing_output(hf_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    for args in (("ckpt", "export", str(tmp_path), "--hf", str(tmp_path / "taken")),
                 ("ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "taken"))):
        code, _, err = kiln_here(capsys, *args)
        assert code == 2 and "already exists; pass --overwrite" in err


def test_export_names_what_is_not_a_checkpoint_or_a_tokenizer(tmp_path, capsys):
    code, _, err = kiln_here(capsys, "ckpt", "export", str(tmp_path), "--hf", str(tmp_path / "out"))
    assert code == 2 and "holds no checkpoint" in err and not (tmp_path / "out").exists()
    step = tmp_path / "step_000002"
    step.mkdir()
    (step / "kiln.json").write_text(json.dumps({"step": 2, "parts": {}, "config": {"model": {"num_layers": 2}, "data": {}}}))
    code, _, err = kiln_here(capsys, "ckpt", "export", str(step), "--hf", str(tmp_path / "out"),
                             "--tokenizer", str(tmp_path / "missing.json"))
    assert code == 2 and "tokenizer file not found" in err and not (tmp_path / "out").exists()


def test_refuses_a_non_llama_model(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(tmp_path / "gpt2"), str(tmp_path / "out"))
    assert code == 2 and "'gpt2' model (GPT2LMHeadModel); kiln imports only Llama" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_refuses_a_layout_the_processes_cannot_make(hf_dir, tmp_path, capsys):
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"), "parallel.tp=2")
    assert code == 2 and "does not divide world size 1" in err
    assert not list(tmp_path.iterdir())  # neither OUT nor its staging directory


def test_refuses_a_config_for_another_model(hf_dir, tmp_path, capsys):
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"), "configs/tiny.yaml",
                             "model.num_layers=3", "model.rope_theta=500000")
    assert code == 2
    assert "model.num_layers: HF model 2, config 3" in err and "model.rope_theta: HF model 10000.0, config 500000" in err
    code, _, err = kiln_here(capsys, "ckpt", "import", "--hf", str(hf_dir), str(tmp_path / "out"), "model.num_layers=3")
    assert code == 2 and "(the model overrides) describes another model" in err and "leave those overrides out" in err
    assert not list(tmp_path.iterdir())


def test_kiln_never_imports_transformers():
    """transformers is a test dependency only: the package must run without it."""
    import ast

    from tests.kiln_run import REPO

    offenders = []
    for path in sorted((REPO / "kiln").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for name in names
                          if name.split(".")[0] == "transformers"]
    assert offenders == []
