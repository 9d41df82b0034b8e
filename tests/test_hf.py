"""Hugging Face interop: transformers configs and weights in, pipeline runs, one-process models out.

No hub: every transformers model here is a small random one built and `save_pretrained` locally.
Two launches carry the multi-process checks: a 2-process one (each family at 2 stages, Llama also
at 1 stage x 2 DP, then trained a few steps and checkpointed) and a 4-process training run
(`python -m resbm_ds.train`, ResBM, 2 stages x 2 DP, on text, from a transformers Llama) that is
consolidated, evaluated and sampled on 1 process.
"""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, launch
from resbm_ds import export, generate
from resbm_ds.hf import configs as hf_configs, weights as hf_weights
from resbm_ds.hf.__main__ import main as hf_main
from resbm_ds.cli import ConfigError
from resbm_ds.config import ModelConfig, load_config

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

V, H, L, T, MB = 128, 64, 4, 32, 2
PIPE = ["bottleneck.method=none", f"data.seq_len={T}", f"deepspeed.train_micro_batch_size_per_gpu={MB}",
        "deepspeed.gradient_accumulation_steps=1", "train.lr=1e-3"]


def family_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=L,
                  num_attention_heads=4, max_position_embeddings=64)
    return {
        # grouped-query attention, untied head, non-default RoPE theta; saved in shards
        "llama": LlamaConfig(**common, num_key_value_heads=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
        # q/k/v biases, one kv head, tied embeddings
        "qwen2": Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True),
        # a sliding window no shorter than the sequence (= full attention), another norm eps
        "mistral": MistralConfig(**common, num_key_value_heads=2, sliding_window=T, rms_norm_eps=1e-5),
    }


def randomize(model):
    """Transformers initialises norms to 1 and biases to 0: perturb everything, so that every
    tensor (and a wrong mapping of it) shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else 0.08)


def local_texts() -> list[str]:
    """A few documents of English text that every machine has: license texts (Debian), else the
    standard library's own source."""
    lic = Path("/usr/share/common-licenses")
    names = ("GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "GPL-2")
    if all((lic / n).is_file() for n in names):
        return [(lic / n).read_text() for n in names]
    import argparse, difflib, logging, pathlib, subprocess   # noqa: E401

    return [Path(m.__file__).read_text() for m in (argparse, logging, pathlib, subprocess, difflib)]


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model(ids).logits, type(model).__name__


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ids = torch.randint(0, V, (MB, T))
    torch.save(ids, tmp / "ids.pt")
    dirs, ref = {}, {}
    for fam, c in family_configs().items():
        model = AutoModelForCausalLM.from_config(c)
        randomize(model)
        dirs[fam] = tmp / fam
        model.save_pretrained(str(dirs[fam]), **({"max_shard_size": "100KB"} if fam == "llama" else {}))
        with torch.no_grad():
            ref[fam] = model(ids).logits
    assert len(list(dirs["llama"].glob("model-*.safetensors"))) > 1   # really sharded
    return tmp, ids, dirs, ref


# ---- 1 process ---------------------------------------------------------------------------------

def test_config_conversion_and_cli(hf_dirs, capsys):
    _, _, dirs, _ = hf_dirs
    m = hf_configs.model_config_from_hf(dirs["llama"])
    shape = (m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.kv_heads, m.ffn_size)
    assert shape == (V, H, L, 4, 2, 96)
    assert m.rope_theta == 5e5 and m.norm_eps == 1e-6 and not m.tie_embeddings and not m.attention_bias
    q = hf_configs.model_config_from_hf(dirs["qwen2"])
    assert q.tie_embeddings and q.attention_bias and q.kv_heads == 1
    assert hf_configs.model_config_from_hf(dirs["mistral"]).max_seq_len == T   # capped at the window
    overrides = [f"data.seq_len={T}", "pipeline.stages=4", "bottleneck.segments=4"]
    assert hf_main(["config", str(dirs["qwen2"]), *overrides]) == 0
    cfg_yaml = hf_dirs[0] / "q.yaml"
    cfg_yaml.write_text(capsys.readouterr().out)
    cfg = load_config(str(cfg_yaml)).validate()
    assert cfg.model.init_from_hf == str(dirs["qwen2"].resolve()) and cfg.pipeline.stages == 4
    assert cfg.model.num_kv_heads == 1 and cfg.model.attention_bias


def test_one_process_logits_equal_transformers(hf_dirs):
    _, ids, dirs, ref = hf_dirs
    diffs = {}
    for fam, path in dirs.items():
        model, cfg = hf_weights.from_hf(path, overrides=PIPE)
        with torch.no_grad():
            diffs[fam] = (model(ids) - ref[fam]).abs().max().item()
    print("max |logit diff| 1 process:", diffs)
    assert all(d == 0.0 for d in diffs.values()), diffs   # the same ops in the same order as transformers


def test_resbm_boundaries_start_fresh_around_pretrained_blocks(hf_dirs):
    _, ids, dirs, ref = hf_dirs
    model, cfg = hf_weights.from_hf(dirs["llama"], overrides=["bottleneck.ratio=8", f"data.seq_len={T}"])
    kinds = [type(x).__name__ for x in model.layers]
    blocks = kinds.count("TransformerBlock") + kinds.count("BlockWithIds")   # ids ride along before the boundary
    assert kinds.count("BottleneckEncoder") == 1 and blocks == L
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all() and (logits - ref["llama"]).abs().max() > 1e-3


def test_stage_reads_only_its_layers(hf_dirs):
    _, _, dirs, _ = hf_dirs
    model, cfg = hf_weights.from_hf(dirs["llama"], overrides=PIPE)
    last_stage = list(model.layers)[3:]   # blocks 2, 3, final norm, head
    names = hf_weights.load_hf_weights(last_stage, dirs["llama"])
    assert names and all("layers.0." not in n and "layers.1." not in n and "embed" not in n for n in names)
    assert "lm_head.weight" in names and "model.layers.3.mlp.down_proj.weight" in names


def _unsupported():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    c = dict(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    quant = LlamaConfig(**c)
    quant.quantization_config = {"quant_method": "bitsandbytes"}
    return [
        (LlamaConfig(**c, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_parameters.rope_type"),
        (LlamaConfig(**c, hidden_act="gelu"), "hidden_act"),
        (LlamaConfig(**c, mlp_bias=True), "mlp_bias"),
        (LlamaConfig(**c, attention_bias=True), "attention_bias"),
        (LlamaConfig(**c, head_dim=32), "head_dim"),
        (LlamaConfig(**c, attention_dropout=0.1), "attention_dropout"),
        (MistralConfig(**c, sliding_window=16), "sliding_window"),
        (Qwen2Config(**c, use_sliding_window=True, sliding_window=16, max_window_layers=1), "sliding_window"),
        (GPT2Config(), "model_type"),
        (quant, "quantization_config"),
    ]


def test_unsupported_transformers_fields_are_named():
    for hf_cfg, field in _unsupported():
        with pytest.raises(hf_configs.UnsupportedHFConfig) as e:
            hf_configs.model_config_from_hf(hf_cfg, seq_len=T)
        assert e.value.key == field and field in str(e.value), (field, str(e.value))


def test_v4_style_config_json_with_rope_scaling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": H, "num_attention_heads": 4, "num_hidden_layers": 2,
        "intermediate_size": 96, "vocab_size": V, "rope_theta": 5e5,
        "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    with pytest.raises(hf_configs.UnsupportedHFConfig, match="rope_type='dynamic'"):
        hf_configs.config_from_hf(tmp_path)


def test_init_from_hf_with_a_different_model_section_is_rejected(hf_dirs):
    _, _, dirs, _ = hf_dirs
    with pytest.raises(ConfigError) as e:
        hf_configs.check_model_matches_hf(ModelConfig(init_from_hf=str(dirs["llama"])), dirs["llama"])
    assert e.value.key == "model.vocab_size" and "python -m resbm_ds.hf config" in str(e.value)


# ---- 2 processes: 2 stages (and 1 stage x 2 DP), then train -> export -> transformers ----------

@pytest.fixture(scope="module")
def two_proc(hf_dirs):
    tmp, ids, dirs, ref = hf_dirs
    out = tmp / "out"
    out.mkdir()
    jobs = []
    for fam, path in dirs.items():
        cfg = hf_configs.config_from_hf(path, load_config(None, PIPE))
        (tmp / f"{fam}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        jobs.append({"name": fam, "config": str(tmp / f"{fam}.yaml"), "ids": str(tmp / "ids.pt")})
    jobs.append({"name": "llama_1stage", "config": str(tmp / "llama.yaml"), "ids": str(tmp / "ids.pt"),
                 "overrides": ["pipeline.stages=1"]})
    jobs[0].update(train_steps=3, run_dir=str(tmp / "run"))   # llama: train and checkpoint
    jobs.append({"name": "qwen2_bf16", "config": str(tmp / "qwen2.yaml"), "ids": str(tmp / "ids.pt"),
                 "overrides": ["deepspeed.bf16.enabled=true"], "train_steps": 2,
                 "run_dir": str(tmp / "run_bf16")})
    # ResBM without the token channel (the paper's form), 2 stages: exported as model_type resbm
    jobs.append({"name": "resbm_noids", "config": str(tmp / "llama.yaml"), "ids": str(tmp / "ids.pt"),
                 "overrides": ["bottleneck.method=resbm", "bottleneck.token_channel=none",
                               "bottleneck.ratio=8", "bottleneck.init=normal"],
                 "train_steps": 2, "run_dir": str(tmp / "run_resbm")})
    (tmp / "plan.json").write_text(json.dumps({"out": str(out), "jobs": jobs}))
    launch([str(REPO / "tests" / "workers" / "hf_worker.py"), str(tmp / "plan.json")], 2,
           env={"RESBM_CACHE": str(tmp / "cache")})
    return tmp, ids, dirs, ref, out


def test_two_stage_logits_equal_transformers(two_proc):
    _, _, dirs, ref, out = two_proc
    diffs = {}
    for name in ("llama", "qwen2", "mistral", "llama_1stage"):
        ranks = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(2)]
        got = torch.load(out / f"{name}.before.pt")
        diffs[name] = (got - ref[name.split("_")[0]]).abs().max().item()
        if name != "llama_1stage":
            assert [r["stage"] for r in ranks] == [0, 1]
    print("max |logit diff| pipeline:", diffs)
    assert all(d == 0.0 for d in diffs.values()), diffs
    last = json.loads((out / "qwen2.rank1.json").read_text())["local_layers"]
    assert last[-1] == "tied_head"   # the tied copy on the last stage got the embedding too


def test_round_trip_train_export_and_load_in_transformers(two_proc):
    tmp, ids, _, _, out = two_proc
    before, after = torch.load(out / "llama.before.pt"), torch.load(out / "llama.after.pt")
    assert (after - before).abs().max() > 1e-2   # training changed the network
    run = tmp / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step3"
    assert export.main([str(run), "--hf", str(tmp / "exported_hf")]) == 0
    consolidated = export.load_model(run / "export" / "step3")
    with torch.no_grad():
        assert (consolidated(ids) - after).abs().max().item() < 1e-5
    logits, cls = hf_logits(tmp / "exported_hf", ids)
    assert cls == "LlamaForCausalLM"
    diff = (logits - after).abs().max().item()
    print("max |logit diff| trained pipeline -> transformers:", diff)
    assert diff < 1e-5


def check_resbm_transformers_export(run, hf_dir, ids, reference) -> "PreTrainedModel":
    """export --hf of a ResBM run, then from_pretrained: model_type resbm, every tensor loaded,
    the logits of `reference`; generate() with transformers' KV cache equals generate() without."""
    assert export.main([str(run), "--hf", str(hf_dir)]) == 0
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "resbm" and "auto_map" not in config
    assert not list(hf_dir.glob("*.py"))   # no code travels with the export
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "ResBMHFForCausalLM"
    with torch.no_grad():
        diff = (model(ids).logits - reference).abs().max().item()
    print(f"max |logit diff| {run.name} -> transformers resbm:", diff)
    assert diff < 1e-5
    prompt = ids[:1, :8]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert cached.shape == (1, 20) and torch.equal(cached, uncached)
    return model


def test_resbm_without_token_channel_exports_as_transformers_model(two_proc):
    tmp, ids, _, _, out = two_proc
    after = torch.load(out / "resbm_noids.after.pt")    # the 2-stage pipeline's logits after training
    stage0, stage1 = (json.loads((out / f"resbm_noids.rank{r}.json").read_text())["local_layers"] for r in range(2))
    assert stage0[-1] == "BottleneckEncoder" and stage1[0] == "BottleneckDecoder"   # the code crossed
    check_resbm_transformers_export(tmp / "run_resbm", tmp / "resbm_hf", ids, after)


# ---- 4 processes: the trainer, from a transformers model, ResBM 2 stages x 2 DP; then 1 process -

@pytest.fixture(scope="module")
def resbm_run(tmp_path_factory):
    """`python -m resbm_ds.train` on text, starting from a transformers Llama (tied embeddings) with a
    ResBM boundary inserted (fresh encoder/decoder between pretrained blocks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from resbm_ds.data.tokenizer import train_sentencepiece

    tmp = tmp_path_factory.mktemp("resbm")
    docs = local_texts()
    train, val = tmp / "train.txt", tmp / "val.txt"
    train.write_text("\n\f\n".join(docs[:-1]))   # a line holding only \f separates documents
    val.write_text(docs[-1])
    spm = train_sentencepiece([str(train)], 512, cache_dir=tmp / "tok")
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=512, hidden_size=H, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    randomize(llama)
    llama.save_pretrained(str(tmp / "llama"))
    run = tmp / "run"
    base = load_config(None, [
        f"data.seq_len={T}", "bottleneck.ratio=8", "bottleneck.identity=orthonormal",
        "deepspeed.train_micro_batch_size_per_gpu=2", "deepspeed.gradient_accumulation_steps=2",
        "deepspeed.zero_optimization.stage=1", "train.steps=6", "train.warmup_steps=2", "train.eval_every=6",
        "train.save_every=6", "train.eval_batches=4", f"train.out_dir={run}", f"data.train_path={train}",
        f"data.val_path={val}", "data.tokenizer=sentencepiece", f"data.tokenizer_path={spm}"])
    cfg = hf_configs.config_from_hf(tmp / "llama", base)
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    launch(["-m", "resbm_ds.train", "--config", str(tmp / "run.yaml")], 4,
           env={"RESBM_CACHE": str(tmp / "cache")})
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r]
    return tmp, run, val, cfg, rows


def test_resbm_2x2_checkpoint_consolidates_evaluates_and_samples(resbm_run, capsys, monkeypatch):
    tmp, run, val, cfg, rows = resbm_run
    monkeypatch.setenv("RESBM_CACHE", str(tmp / "cache"))
    losses = [r["loss"] for r in rows if "loss" in r]
    (val_loss,) = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert export.main([str(run), "--out", str(tmp / "exported")]) == 0
    model = export.load_model(tmp / "exported")
    kinds = [type(x).__name__ for x in model.layers]
    assert kinds.count("BottleneckEncoder") == kinds.count("BottleneckDecoder") == 1
    assert model.tied_head == len(kinds) - 1

    # 1-process perplexity over the chunks the run's validation covered (the first
    # eval_batches x micro_batch x DP chunks of the validation text) == the run's val_loss.
    chunks = cfg.train.eval_batches * cfg.micro_batch_size * 2
    tok = generate.load_tokenizer(tmp / "exported")
    result = generate.evaluate(model, tok, val, max_chunks=chunks)
    print(f"val loss: training run {val_loss}, consolidated model {result['loss']}")
    assert math.isclose(result["loss"], val_loss, rel_tol=1e-4)
    assert math.isclose(result["perplexity"], math.exp(val_loss), rel_tol=1e-3)

    text = generate.sample(model, tok, "This License", max_new_tokens=24, seed=1)
    assert isinstance(text, str) and text.strip()
    capsys.readouterr()
    assert generate.main(["sample", str(run), "--prompt", "GNU", "--max-new-tokens", "8"]) == 0   # run dir
    assert capsys.readouterr().out.startswith("GNU")
    assert generate.main(["evaluate", str(tmp / "exported"), "--max-chunks", str(chunks)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isclose(line["loss"], val_loss, rel_tol=1e-4) and line["chunks"] == chunks

    # The run's own validation text is the default (data.val_path here).
    assert generate.main(["evaluate", str(run), "--max-chunks", str(chunks)]) == 0
    assert math.isclose(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"], val_loss, rel_tol=1e-4)


def test_resbm_token_channel_run_exports_to_transformers_with_its_tokenizer(resbm_run, capsys, monkeypatch):
    """The 2x2 token-channel run as a transformers model: the consolidated model's logits, text from
    generate(), and the sentencepiece tokenizer as a fast tokenizer with the same ids."""
    from transformers import AutoTokenizer

    from resbm_ds.data.tokenizer import load_saved_tokenizer

    tmp, run, val, cfg, _ = resbm_run
    monkeypatch.setenv("RESBM_CACHE", str(tmp / "cache"))
    consolidated = export.consolidate(run)
    assert (cfg.token_channel, cfg.token_ids) == ("hashed", "local")      # the default side channel
    ids = torch.randint(0, cfg.model.vocab_size, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = consolidated(ids)
    model = check_resbm_transformers_export(run, tmp / "hf", ids, reference)

    spm = load_saved_tokenizer(run / "tokenizer")
    fast = AutoTokenizer.from_pretrained(str(tmp / "hf"))
    text = val.read_text()
    for piece in [text, *text.split("\n")[:200], "  two  spaces, tab\t, unicode \u00e9\u2603 and 12345"]:
        ours = spm.encode(piece)
        assert fast.encode(piece, add_special_tokens=False) == ours
        assert fast.decode(ours, clean_up_tokenization_spaces=False) == spm.decode(ours)
    assert spm.decode(spm.encode(text)) == text and fast.eos_token_id == spm.eos_id

    prompt = fast("This License", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    new_text = fast.decode(out[0, prompt["input_ids"].shape[1]:])
    assert out.shape[1] > prompt["input_ids"].shape[1] and new_text.strip(), new_text
    # generate sample on the transformers directory: the same greedy text as on the run directory
    for source in (tmp / "hf", run):
        capsys.readouterr()
        assert generate.main(["sample", str(source), "--prompt", "GNU", "--max-new-tokens", "8",
                              "--temperature", "0"]) == 0
        printed = capsys.readouterr().out
        assert printed.startswith("GNU")
        if source == run:
            assert printed == from_hf_dir, (printed, from_hf_dir)
        from_hf_dir = printed


def test_generate_and_export_errors_are_one_line(resbm_run, capsys):
    tmp, run, *_ = resbm_run
    for tool, argv, names in ((generate, ["sample", str(tmp / "no_such_run")], "no_such_run"),
                              (generate, ["evaluate", str(run), "--text", str(tmp / "missing.txt")], "missing.txt"),
                              (export, [str(tmp / "no_such_run")], "no_such_run"),
                              (export, [str(run), "--hf", str(tmp / "fam"), "--family", "llama"], "--family")):
        try:
            code = tool.main(argv)
        except SystemExit as e:   # argparse's usage errors (a --text that does not exist): one line too
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and names in err and "Traceback" not in err, err


def test_bf16_tied_qwen2_round_trip(two_proc):
    from transformers import AutoModelForCausalLM

    tmp, ids, _, _, out = two_proc
    after = torch.load(out / "qwen2_bf16.after.pt")   # the bf16 pipeline's logits after training
    model = export.consolidate(tmp / "run_bf16")
    assert model.dtype == torch.bfloat16 and model.tied_head is not None
    with torch.no_grad():
        diff = (model(ids).float() - after).abs().max().item()
    print("max |logit diff| bf16 pipeline vs consolidated:", diff)
    assert diff < 1e-6
    hf_weights.save_hf(model, tmp / "qwen2_bf16_hf")
    assert json.loads((tmp / "qwen2_bf16_hf" / "config.json").read_text())["dtype"] == "bfloat16"
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp / "qwen2_bf16_hf"), dtype=torch.float32)
    with torch.no_grad():   # the same bf16 weights, both computed in fp32: the same network
        diff = (model.float()(ids) - hf_model(ids).logits).abs().max().item()
    assert type(hf_model).__name__ == "Qwen2ForCausalLM" and diff < 1e-5, diff
