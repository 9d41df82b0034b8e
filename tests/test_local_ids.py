"""bottleneck.token_ids=local: every stage reads the token ids from its own copy of the data, so only
the code crosses, and the model computes what it computes with the ids sent (model/local_ids.py).

Real pipelines under DeepSpeed's 1F1B schedule with gradient accumulation, then an evaluation: the
ids each token-channel decoder read, micro-batch by micro-batch, are those the first stage's
embedding read (tests/workers/pipe_worker.py records a hash of each)."""
import shutil

import pytest

from conftest import launch, rows, run_pipe_worker_cases, train_args
from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

H, V, T, MB, h = 64, 256, 32, 2, 4
SMALL = [f"model.vocab_size={V}", f"model.hidden_size={H}", "model.num_heads=4", f"model.max_seq_len={T}",
         f"data.seq_len={T}", f"bottleneck.width={h}", "bottleneck.token_channel=learned",
         f"deepspeed.train_micro_batch_size_per_gpu={MB}"]
STEPS = 2


def sent_and_local(tmp_path, nprocs, *overrides):
    """{mode: per-rank reports} of the same run with the ids sent and read locally, in one launch."""
    return run_pipe_worker_cases(tmp_path, nprocs, STEPS,
                                 {mode: [*SMALL, *overrides, f"bottleneck.token_ids={mode}"]
                                  for mode in ("sent", "local")})


def check(runs, stages, dp, gas, boundaries):
    """Every decoder read the ids of the micro-batch its stage computed; only the code crossed;
    the losses are the sent run's."""
    tokens = MB * gas * T
    for mode, reports in runs.items():
        for d in range(dp):
            pipe = [reports[s * dp + d] for s in range(stages)]          # rank = stage * dp + dp_id
            inputs = pipe[0]["ids_seen"]["inputs"]
            assert len(inputs) == (STEPS + 1) * gas and len(set(inputs)) == len(inputs), (mode, inputs)
            read = {b: ids for r in pipe for b, ids in r["ids_seen"].items() if b != "inputs"}
            assert sorted(read) == [f"b{b}" for b in range(boundaries)], (mode, sorted(read))
            for b, ids in read.items():
                assert ids == inputs, (mode, d, b)
            per_token = h * 4 + (2 if mode == "sent" else 0)               # fp32 code (+ int16 ids)
            for sender, receiver in zip(pipe, pipe[1:]):                  # each stage boundary
                assert [w["sent_fwd"] for w in sender["wire"]] == [tokens * per_token] * STEPS, (mode, sender["wire"])
                assert [w["sent_bwd"] for w in receiver["wire"]] == [tokens * h * 4] * STEPS
        if dp > 1:                                                        # each data-parallel rank its shard
            assert reports[0]["ids_seen"]["inputs"] != reports[1]["ids_seen"]["inputs"]
    sent, local = runs["sent"], runs["local"]
    for s, l in zip(sent, local):
        assert l["losses"] == pytest.approx(s["losses"], rel=1e-6) and l["eval_loss"] == pytest.approx(s["eval_loss"], rel=1e-6)
        if l["stage"] == stages - 1:
            assert l["losses"][-1] < l["losses"][0]


def test_two_stages_two_data_parallel(tmp_path):
    gas = 3
    runs = sent_and_local(tmp_path, 4, "model.num_layers=2", f"deepspeed.gradient_accumulation_steps={gas}")
    check(runs, stages=2, dp=2, gas=gas, boundaries=1)


def test_three_stages_with_boundaries_inside_each_stage(tmp_path):
    """6 segments on 3 stages: every stage holds decoders, one right after its stage cut and one inside."""
    gas = 4
    runs = sent_and_local(tmp_path, 3, "model.num_layers=6", "bottleneck.segments=6", "pipeline.stages=3",
                          f"deepspeed.gradient_accumulation_steps={gas}")
    check(runs, stages=3, dp=1, gas=gas, boundaries=5)


def test_local_ids_cost_no_bytes():
    """At H=256 in bf16, 128x vs dense bf16 leaves 4 bytes per token: with local ids, h=2."""
    cfg = load_config(None, ["model.hidden_size=256", "bottleneck.width=2", "deepspeed.bf16.enabled=true",
                             "bottleneck.token_ids=local"]).validate()
    assert cfg.wire_bytes_per_token == (4, 4) and cfg.compression_ratio() == 128
    cfg.bottleneck.token_ids = "sent"
    assert cfg.wire_bytes_per_token == (4 + 2, 4) and cfg.compression_ratio() == 512 / 6


def test_the_single_process_model_computes_the_same_function():
    """ResBMForCausalLM (exports, generation) hands its input ids to the decoders itself."""
    import torch
    from resbm_ds.model.causal_lm import ResBMForCausalLM
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("sent", "local"):
        cfg = load_config(None, [*SMALL, "model.num_layers=3", "bottleneck.segments=3", "pipeline.stages=3",
                                 "bottleneck.init=normal", f"bottleneck.token_ids={mode}"]).validate()
        logits[mode] = ResBMForCausalLM(cfg.spec)(ids)
    assert torch.equal(logits["sent"], logits["local"])


@pytest.mark.parametrize("overrides", [["bottleneck.token_channel=none"], ["bottleneck.method=subspace"],
                                       ["bottleneck.token_ids=wire"]])
def test_local_ids_need_a_token_channel_of_their_own(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["bottleneck.token_ids=local", *overrides]).validate()
    assert e.value.key == "bottleneck.token_ids"


def test_resume_restores_the_data_on_every_stage(tmp_path):
    """The trainer's --resume on 3 stages: each stage restores its own data position from its own
    checkpoint file, so the middle stage's decoder reads the right ids again and the resumed steps
    and evaluation equal the uninterrupted run's."""
    args = ["model.num_layers=3", "bottleneck.segments=3", "pipeline.stages=3", "bottleneck.init=normal",
            "bottleneck.token_ids=local", "train.steps=4", "train.save_every=2", "train.eval_every=2"]
    ref = tmp_path / "ref"
    launch(["-m", *train_args(ref, *args)], 3)
    expected = losses(ref)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    proc = launch(["-m", *train_args(resumed, *args), "--resume-from", "step2"], 3)
    assert "resuming at step 3" in proc.stdout
    got = losses(resumed)
    assert sorted(got) == sorted(expected) == [(1, "loss"), (2, "loss"), (2, "val_loss"), (3, "loss"),
                                               (4, "loss"), (4, "val_loss")]
    for key in [(3, "loss"), (4, "loss"), (4, "val_loss")]:
        assert got[key] == pytest.approx(expected[key], rel=1e-6), (key, got, expected)


def losses(out):
    return {(r["step"], k): r[k] for r in rows(out) for k in ("loss", "val_loss") if k in r}


def test_an_untested_deepspeed_is_refused_before_launch(monkeypatch):
    """The patch reads the pipeline engine's internals: another DeepSpeed version fails in one line."""
    import deepspeed
    from resbm_ds.launch import check_config
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    with pytest.raises(ConfigError) as e:
        check_config(load_config(None, [*SMALL, "model.num_layers=2", "bottleneck.token_ids=local"]), 2)
    assert e.value.key == "bottleneck.token_ids" and "installed: 0.20.0" in str(e.value)
