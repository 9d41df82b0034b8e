"""Parameter and byte accounting before launch (model/accounting.py), at the paper's shape: exact
counts from the architecture's formula, on the meta device, in seconds. That each stage's count is
what the real DeepSpeed engine of that stage trains is checked in test_wire_bytes.py, on every case."""
import os
import resource
import subprocess
import sys
import time

import pytest

from conftest import REPO
from resbm_ds.config import load_config
from resbm_ds.model.accounting import OVERHEAD_BUDGET, parameter_counts

H, LAYERS, STAGES, h = 4096, 32, 8, 4096 // 128
FFN = 10944                             # SwiGLU 8/3 H = 10,922.7, rounded up to a multiple of 64
BLOCK = 4 * H * H + 3 * H * FFN + 2 * H   # q, k, v, o (no GQA: kv heads = heads); gate, up, down; 2 RMSNorms
ENCODER = H * h + H                       # W_e and its RMSNorm
DECODER = h * H + h                       # W_d and the RMSNorm over the code
PER_STAGE_BLOCKS = LAYERS // STAGES
BUCKETS = 4096                            # the default side channel: a hashed 4,096 x H table per decoder


def counts(cfg):
    """The counts of a run config's model, cut into its pipeline.stages."""
    return parameter_counts(cfg.spec, cfg.pipeline.stages)

def expected(V, table_rows=BUCKETS):
    table = table_rows * H
    first = V * H + PER_STAGE_BLOCKS * BLOCK + ENCODER
    middle = DECODER + table + PER_STAGE_BLOCKS * BLOCK + ENCODER
    last = DECODER + table + PER_STAGE_BLOCKS * BLOCK + H + V * H   # final norm, untied head
    return dict(stages=(first, *[middle] * (STAGES - 2), last), boundary=(STAGES - 1) * (ENCODER + DECODER),
                side_channel=(STAGES - 1) * table, share=(DECODER + table + ENCODER) / (PER_STAGE_BLOCKS * BLOCK))


@pytest.mark.parametrize("V", [32000, 128256])
def test_paper_shape_counts_are_exact_fast_and_allocate_nothing(V):
    cfg = load_config("paper-2b", [f"model.vocab_size={V}"]).validate()
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.pipeline.stages, cfg.code_width) == (H, LAYERS, STAGES, h)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    c = counts(cfg)
    seconds, grown_mb = time.perf_counter() - t0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    want = expected(V)
    assert c.stages == want["stages"]
    assert c.total == sum(want["stages"])
    assert c.boundary == want["boundary"] and c.side_channel == want["side_channel"] and c.frozen == 0
    assert c.overhead_share == pytest.approx(want["share"])     # a middle stage: the table's stage
    assert c.overhead_share <= OVERHEAD_BUDGET                  # 2.1% at either vocabulary
    assert "within the 5% budget" in c.budget_words
    assert seconds < 5, seconds
    assert grown_mb < 200, grown_mb         # 7.6B-11.2B parameters would be 30-45 GB in fp32


def test_frozen_tables_are_counted_apart_and_a_tied_embedding_once():
    small = ["model.hidden_size=64", "model.vocab_size=256", "model.num_heads=4", "model.num_layers=2",
             "bottleneck.width=4", "pipeline.stages=2"]
    learned = counts(load_config(None, [*small, "bottleneck.token_channel=learned"]).validate())
    frozen = counts(load_config(None, [*small, "bottleneck.token_channel=frozen"]).validate())
    assert learned.side_channel == 256 * 64 and frozen.side_channel == 0 and frozen.frozen == 256 * 64
    assert learned.total - frozen.total == 256 * 64
    tied = counts(load_config(None, [*small, "bottleneck.token_channel=learned", "model.tie_embeddings=true"]).validate())
    assert tied.total == learned.total - 256 * 64                  # the head reuses the embedding
    assert sum(tied.stages) == tied.total + 256 * 64                # but both stages hold it


@pytest.mark.slow
def test_dry_run_prints_the_counts_in_seconds():
    """No launcher: the counts come first, then the launch check says 8 stages need 8 processes."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "resbm_ds.train", "--config", "paper-2b", "--dry-run",
                           "model.vocab_size=128256"], cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    seconds = time.perf_counter() - t0
    total = sum(expected(128256)["stages"])
    assert f"[resbm] parameters: {total:,} total" in proc.stdout, proc.stdout + proc.stderr
    assert f"side channel (hashed token tables) {7 * BUCKETS * H:,}" in proc.stdout
    assert "within the 5% budget" in proc.stdout
    assert "[resbm] wire: 64 bytes per token forward, 64 backward" in proc.stdout   # 32 bf16, ids read locally
    assert proc.returncode == 2 and "must divide the world size" in proc.stderr
    assert seconds < 60, seconds            # mostly importing torch and DeepSpeed on a busy 2-core box


@pytest.mark.parametrize("V", [32000, 128256])
def test_a_learned_table_grows_with_the_vocabulary_and_breaks_the_budget(V):
    """bottleneck.token_channel=learned (a V x H table per decoder, the form the default replaced):
    +16.3% of a stage at V=32,000, +65% at V=128,256; the plan line says so."""
    c = counts(load_config("paper-2b", [f"model.vocab_size={V}", "bottleneck.token_channel=learned"]).validate())
    want = expected(V, table_rows=V)
    assert c.side_channel == want["side_channel"] and c.boundary == want["boundary"]
    assert c.stages == want["stages"]
    assert c.overhead_share == pytest.approx(want["share"]) and c.overhead_share > OVERHEAD_BUDGET
    assert "over the 5% budget" in c.budget_words
