"""The ResBM pipeline through the real DeepSpeed engine, in several processes over gloo."""
import math

import pytest

from conftest import run_pipe_worker, run_pipe_worker_cases

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

SMALL = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
         "model.max_seq_len=32", "data.seq_len=32", "bottleneck.ratio=8",
         "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=4"]
MB, T, GAS, H = 4, 32, 4, 64
STEPS = 6


IDS = 0   # the default ResBM boundary reads the token ids on each stage: only the code crosses


def per_step_bytes(width, elem_bytes, ids=0):
    return GAS * MB * T * (width * elem_bytes + ids)


@pytest.fixture(scope="module")
def two_stage_cases(tmp_path_factory):
    """The 2-stage runs of this file, one after another in one launch (a fresh engine each)."""
    tmp = tmp_path_factory.mktemp("two_stage")
    reports = run_pipe_worker_cases(tmp, 2, STEPS, {
        "default": ["--save=" + str(tmp / "ckpt"), *SMALL],
        "uncompressed": ["bottleneck.method=none", *SMALL],
        "bf16": ["deepspeed.bf16.enabled=true", *SMALL],
        "bf16_wire": ["bottleneck.wire_dtype=bf16", *SMALL],
        "int4": [*INT4, *SMALL],
    })
    return tmp, reports


@pytest.fixture(scope="module")
def two_stage(two_stage_cases):
    tmp, reports = two_stage_cases
    return tmp, reports["default"]


@pytest.fixture(scope="module")
def one_process(two_stage, tmp_path_factory):
    """The 1-process twin: trained as the 2-stage default, loaded from its checkpoint, and fresh."""
    tmp, _ = two_stage
    return run_pipe_worker_cases(tmp_path_factory.mktemp("one_process"), 1, STEPS, {
        "trained": ["pipeline.stages=1", *SMALL],
        "loaded": ["--load=" + str(tmp / "ckpt"), "--steps=0", "pipeline.stages=1", *SMALL],
        "fresh": ["--steps=0", "pipeline.stages=1", *SMALL],
        "int4": ["pipeline.stages=1", *INT4, *SMALL],
    })


INT4 = ("wire.codec=int4", "wire.codec_backward=true")


def falling(losses):
    return losses[-1] < losses[0] - 0.05


def test_two_stages_train_and_send_only_the_code(two_stage):
    _, (s0, s1) = two_stage
    assert s0["local_layers"][-1] == "BottleneckEncoder" and s1["local_layers"][0] == "BottleneckDecoder"
    assert falling(s0["losses"]), s0["losses"]
    h = H // 8
    assert s0["code_width"] == h and s0["compression_ratio"] == 4 * H / (4 * h + IDS)
    for w0, w1 in zip(s0["wire"], s1["wire"]):
        assert w0["sent_fwd"] == w1["recv_fwd"] == per_step_bytes(h, 4, IDS)
        assert w1["sent_bwd"] == w0["recv_bwd"] == per_step_bytes(h, 4)
        assert w0["sent_bwd"] == w1["sent_fwd"] == 0
        assert w0["sends"] == w1["sends"] == GAS   # the code per micro-batch (no ids); the code's gradient


def test_one_process_matches_two_stages(two_stage, one_process):
    _, (s0, _) = two_stage
    (one,) = one_process["trained"]
    assert one["local_layers"].count("BottleneckEncoder") == 1   # the boundary is inside the stage
    assert all(w["sent_fwd"] == w["recv_bwd"] == 0 for w in one["wire"])
    # Same model, seed and data; only float summation order may differ (measured: 0 and 1e-7 relative).
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], s0["losses"]))
    assert worst < 1e-5, (worst, one["losses"], s0["losses"])


def test_a_wire_codec_quantises_a_boundary_inside_a_stage_too(two_stage_cases, one_process):
    """wire.codec=int4 both ways: on 2 stages the p2p codec quantises the code and its gradient; in
    one process the boundary crosses no wire, and the engine gives its encoder the same round trip
    (engine.codec_inside_stages), so the losses are the 2-stage ones, and not the unquantised ones."""
    s0, _ = two_stage_cases[1]["int4"]
    (one,), (plain,) = one_process["int4"], one_process["trained"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], s0["losses"]))
    assert worst < 1e-5, (worst, one["losses"], s0["losses"])
    assert s0["wire"][-1]["sent_fwd"] == GAS * MB * T * (H // 8 // 2 + 2)    # 4 bits a value + a bf16 scale
    assert max(abs(a - b) for a, b in zip(one["losses"][1:], plain["losses"][1:])) > 1e-4   # the codec acts


def test_two_stage_checkpoint_loads_into_one_process(two_stage, one_process):
    _, (s0, _) = two_stage
    (one,), (fresh,) = one_process["loaded"], one_process["fresh"]
    assert math.isclose(one["eval_loss"], s0["eval_loss"], rel_tol=1e-4)
    assert abs(fresh["eval_loss"] - s0["eval_loss"]) > 1e-3   # the load did change the weights


def test_three_stages_train(tmp_path):
    reports = run_pipe_worker(tmp_path, 3, STEPS, ["pipeline.stages=3", "bottleneck.segments=3",
                                                   "model.num_layers=3", *SMALL])
    s0, s1, s2 = reports
    assert falling(s2["losses"]), s2["losses"]
    assert s1["local_layers"][0] == "BottleneckDecoder" and s1["local_layers"][-1] == "BottleneckEncoder"
    w = s1["wire"][-1]
    assert w["recv_fwd"] == w["sent_fwd"] == per_step_bytes(H // 8, 4, IDS)
    assert w["recv_bwd"] == w["sent_bwd"] == per_step_bytes(H // 8, 4)


def test_uncompressed_pipeline_sends_full_hidden_state(two_stage_cases):
    s0, s1 = two_stage_cases[1]["uncompressed"]
    assert s0["compression_ratio"] == 1 and "BottleneckEncoder" not in s0["local_layers"]
    assert s0["wire"][-1]["sent_fwd"] == s1["wire"][-1]["sent_bwd"] == per_step_bytes(H, 4)


def test_pipeline_by_data_parallel_zero1_replicas_stay_identical(tmp_path):
    reports = run_pipe_worker(tmp_path, 4, 4, ["deepspeed.zero_optimization.stage=1", *SMALL])
    by_stage = {}
    for r in reports:
        by_stage.setdefault(r["stage"], []).append(r)
    assert sorted(by_stage) == [0, 1] and all(len(v) == 2 for v in by_stage.values())
    for stage, (a, b) in by_stage.items():
        assert {a["dp_rank"], b["dp_rank"]} == {0, 1}
        assert a["param_hash"] == b["param_hash"], f"stage {stage} replicas diverged"
    assert falling(by_stage[1][0]["losses"])
    assert by_stage[0][0]["param_hash"] != by_stage[1][0]["param_hash"]


def test_bf16_model_and_wire(two_stage_cases):
    s0, s1 = two_stage_cases[1]["bf16"]
    assert s0["param_dtypes"] == ["torch.bfloat16"]
    assert falling(s1["losses"]), s1["losses"]
    assert s0["wire"][-1]["sent_fwd"] == per_step_bytes(H // 8, 2, IDS)
    assert s1["wire"][-1]["sent_bwd"] == per_step_bytes(H // 8, 2)


def test_fp32_model_with_bf16_wire_halves_the_bytes(two_stage_cases):
    fp32_s0, _ = two_stage_cases[1]["default"]
    s0, s1 = two_stage_cases[1]["bf16_wire"]
    assert s0["param_dtypes"] == ["torch.float32"]
    assert 2 * (s0["wire"][-1]["sent_fwd"] - per_step_bytes(0, 0, IDS)) == \
        fp32_s0["wire"][-1]["sent_fwd"] - per_step_bytes(0, 0, IDS)          # the code halves, any ids stay
    assert 2 * s1["wire"][-1]["sent_bwd"] == fp32_s0["wire"][-1]["recv_bwd"]
    assert s1["losses"][-1] < s1["losses"][0], s1["losses"]
