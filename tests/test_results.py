"""The committed convergence results (results/convergence/results.json) hold what the evidence needs:
a representative evaluation with its references, runs that learned beyond token frequencies, three
seeds for every headline pair and a long horizon. Fast lane: reads the file only."""
import json

import pytest

from conftest import REPO
from resbm_ds.bench.convergence import COLLAPSED, HEADLINE, LONG, PAIRS

RESULTS = REPO / "results" / "convergence" / "results.json"


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_the_evaluation_is_large_and_carries_its_references(results):
    ev = results["eval"]
    assert ev["tokens"] >= 128_000
    assert ev["bigram_ce"] < ev["unigram_ce"]
    sources = " ".join(ev["by_source"])                 # a loss per source of the corpus
    assert all(name in sources for name in ("gutenberg", "sotu", "brown")), sources


def test_every_run_reports_what_it_trained_and_its_curve(results):
    for e in results["runs"]:
        if e["status"] in ("ok", "partial"):
            m = e["metrics"]
            assert e["label"] and isinstance(e["seed"], int) and m["tokens"] > 0, e["name"]
            assert m["val_curve"][-1]["val_loss"] == m["final_val_loss"], e["name"]
            assert len(m["val_curve"]) >= 4 or e["status"] == "partial", e["name"]   # every 256k tokens


def test_every_run_learned_beyond_token_frequencies(results):
    unigram = results["eval"]["unigram_ce"]
    for e in results["runs"]:                            # a run stopped part-way too
        if e.get("metrics"):
            assert e["metrics"]["final_val_loss"] < unigram - COLLAPSED, e["name"]


def test_only_lrs_above_a_familys_tuned_lr_diverged(results):
    """A run within COLLAPSED nats of the unigram loss (kept under `diverged`, used in no comparison) is
    an lr-sweep or warmup-check point above its family's tuned lr: it shows that lr is too high."""
    unigram = results["eval"]["unigram_ce"]
    tuned = {f: sw["tuned_lr"] for f, sw in results["sweep"].items()}
    for e in results["diverged"]:
        assert e["metrics"]["final_val_loss"] > unigram - COLLAPSED, e["name"]
        assert e["phase"] in ("sweep", "warmup") and e["lr"] > tuned[e["family"]], e["name"]
    for f, lr in tuned.items():
        assert results["sweep"][f]["val_loss"][f"{lr:g}"] < unigram - COLLAPSED, f


def test_headline_pairs_have_three_seeds_and_the_trio_a_long_horizon(results):
    pairs = {(p["compressed"], p["control"]): p for p in results["pairs"]}
    for comp, ctrl, _ in PAIRS:
        assert comp in HEADLINE and len(pairs[(comp, ctrl)]["seeds"]) == 3, (comp, ctrl)
    long = {e["name"]: e for e in results["runs"] if e["phase"] == "long" and e["status"] == "ok"}
    for family in LONG:
        assert long[f"{family}-long"]["metrics"]["tokens"] >= 6_000_000, family
