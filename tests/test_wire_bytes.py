"""Every byte between stages, predicted and measured: `Config.wire_bytes_per_token` (the one formula
behind every printed and stored ratio) against the wire meter of real 2-stage runs, for every dtype,
codec, baseline and boundary variant; and the traffic between stages outside p2p (collectives)."""
import pytest

from conftest import run_pipe_worker, run_pipe_worker_cases
from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config
from resbm_ds.model.accounting import parameter_counts

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

H, V, T, MB, GAS = 64, 256, 32, 2, 2
SMALL = [f"model.vocab_size={V}", f"model.hidden_size={H}", "model.num_layers=2", "model.num_heads=4",
         f"model.max_seq_len={T}", f"data.seq_len={T}", "bottleneck.width=4",
         f"deepspeed.train_micro_batch_size_per_gpu={MB}", f"deepspeed.gradient_accumulation_steps={GAS}"]
TOKENS_PER_STEP = MB * GAS * T

CASES = {
    "fp32-default": [],                                   # the default boundary: the code (ids read locally)
    "fp32-no-ids": ["bottleneck.token_channel=none"],
    "paper-form-tied": ["bottleneck.init=normal", "bottleneck.token_channel=none", "model.tie_embeddings=true"],
    "ids-tied": ["model.tie_embeddings=true", "bottleneck.token_ids=sent"],
    "bf16": ["deepspeed.bf16.enabled=true"],
    "bf16-wire-on-fp32": ["bottleneck.wire_dtype=bf16"],
    "int8": ["wire.codec=int8", "bottleneck.token_ids=sent"],   # codec payload + scale, and the ids as they are
    "fp8-both-ways": ["wire.codec=fp8", "wire.codec_backward=true"],
    "int4-both-ways": ["wire.codec=int4", "wire.codec_backward=true"],           # 4 values in 2 bytes
    "int2-odd-width-both-ways": ["wire.codec=int2", "wire.codec_backward=true",   # 5 values in 2 bytes
                                "bottleneck.width=5", "bottleneck.token_channel=none"],
    "subspace": ["bottleneck.method=subspace"],
    "noskip": ["bottleneck.method=bottleneck-noskip"],
    "token-channel": ["bottleneck.token_channel=learned", "bottleneck.token_ids=sent"],   # code + int16 ids
    "token-channel-hashed": ["bottleneck.token_channel=hashed", "bottleneck.token_buckets=37",
                             "bottleneck.token_ids=sent"],
    "token-ids-local": ["bottleneck.token_channel=learned", "bottleneck.token_ids=local"],
    "token-channel-mlp-bf16": ["bottleneck.token_channel=lowrank", "bottleneck.decoder=mlp",
                               "bottleneck.wire_dtype=bf16"],
    "uncompressed": ["bottleneck.method=none"],
    "uncompressed-token-control": ["bottleneck.method=none", "bottleneck.token_channel=frozen"],
}


@pytest.fixture(scope="module")
def case_reports(tmp_path_factory):
    """Every case's 2-stage run, one after another in one launch (a fresh engine each)."""
    return run_pipe_worker_cases(tmp_path_factory.mktemp("wire"), 2, 2,
                                 {case: [*SMALL, *extra] for case, extra in CASES.items()})


@pytest.mark.parametrize("case", sorted(CASES))
def test_predicted_bytes_and_ratio_equal_the_meter(case, case_reports):
    cfg = load_config(None, [*SMALL, *CASES[case]]).validate(world_size=2)
    fwd, bwd = cfg.wire_bytes_per_token
    s0, s1 = case_reports[case]
    for w0, w1 in zip(s0["wire"], s1["wire"]):
        assert w0["sent_fwd"] == w1["recv_fwd"] == TOKENS_PER_STEP * fwd, (case, w0, fwd)
        assert w1["sent_bwd"] == w0["recv_bwd"] == TOKENS_PER_STEP * bwd, (case, w1, bwd)
    busier = max(s0["wire"][-1]["sent_fwd"], s1["wire"][-1]["sent_bwd"]) / TOKENS_PER_STEP
    assert cfg.compression_ratio("model") == cfg.dense_bytes_per_token("model") / busier == s0["compression_ratio"]
    assert cfg.compression_ratio() == 2 * H / busier        # against dense bf16 (REFERENCE 8)
    assert s1["losses"][-1] < s1["losses"][0], s1["losses"]
    # the meta-device count of each stage is what that stage's DeepSpeed engine really trains
    assert [s0["parameters"], s1["parameters"]] == list(parameter_counts(cfg.spec, cfg.pipeline.stages).stages), case


def test_ratios_in_bytes():
    def cfg(*o):
        return load_config(None, [f"model.hidden_size={H}", "bottleneck.width=4", "bottleneck.token_channel=none",
                                  *o]).validate()
    assert cfg().wire_bytes_per_token == (16, 16) and cfg().compression_ratio() == 8   # fp32 code
    assert cfg("bottleneck.wire_dtype=bf16").compression_ratio() == 16
    assert cfg("bottleneck.wire_dtype=bf16").compression_ratio("model") == 32
    assert cfg("wire.codec=int8").wire_bytes_per_token == (4 + 2, 16)                 # h + bf16 scale
    assert cfg("wire.codec=int4").wire_bytes_per_token == (2 + 2, 16)                 # two values a byte
    assert cfg("wire.codec=int2", "wire.codec_backward=true").wire_bytes_per_token == (1 + 2, 1 + 2)
    assert cfg("wire.codec=int2", "bottleneck.width=5").wire_bytes_per_token == (2 + 2, 20)   # padded
    assert cfg("bottleneck.token_channel=learned", "bottleneck.token_ids=sent").wire_bytes_per_token == (16 + 2, 16)
    assert cfg("bottleneck.token_channel=learned").wire_bytes_per_token == (16, 16)   # ids read locally (auto)
    big = ["model.vocab_size=50000", f"model.hidden_size={H}", "bottleneck.width=4"]
    default = load_config(None, big).validate()
    assert (default.token_channel, default.token_ids, default.wire_bytes_per_token) == ("hashed", "local", (16, 16))
    sent = load_config(None, [*big, "bottleneck.token_ids=sent"]).validate()
    assert sent.wire_bytes_per_token == (16 + 4, 16)                                   # int32 ids
    assert load_config(None, ["bottleneck.method=none"]).validate().token_channel == "none"


@pytest.mark.parametrize("overrides,key", [
    (["bottleneck.method=none", "bottleneck.wire_dtype=bf16"], "bottleneck.wire_dtype"),
    (["bottleneck.method=subspace", "bottleneck.decoder=mlp"], "bottleneck.decoder"),
    (["bottleneck.method=bottleneck-noskip", "bottleneck.token_channel=learned"], "bottleneck.token_channel"),
    (["bottleneck.token_channel=lowrank", "bottleneck.token_rank=0"], "bottleneck.token_rank"),
    (["bottleneck.token_channel=hashed", "bottleneck.token_buckets=0"], "bottleneck.token_buckets"),
])
def test_meaningless_or_uncounted_combinations_are_refused(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*SMALL, *overrides]).validate(world_size=2)
    assert e.value.key == key


def test_collectives_between_stages_are_counted_and_delayed(tmp_path):
    """A compressed tied-embedding pipeline: the tied gradient all-reduce (V x H x 4 bytes a step)
    and the engine's scalar collectives cross stages outside p2p; the meter counts them as `other`
    and the emulated link delays them."""
    overrides = [*SMALL, "model.tie_embeddings=true", "wire.link_bandwidth_mbps=1000"]
    s0, s1 = run_pipe_worker(tmp_path, 2, 3, overrides)
    tied = V * H * 4
    assert load_config(None, overrides).tied_allreduce_bytes == tied
    for w0, w1 in zip(s0["wire"], s1["wire"]):
        # each collective counted once: the tied all-reduce and the clip-norm sum on rank 0 (the
        # lowest of the group), the loss broadcast on rank 1 (its source); measured 65,540 + 8
        assert tied < w0["other"] + w1["other"] <= tied + 64, (w0, w1)
        assert w0["collectives"] + w1["collectives"] == 3, (w0, w1)
    assert s0["link_collectives"] >= 3 * 3 and s1["link_collectives"] >= 3 * 3   # every member pays the link
