"""Muon and AdamW through the real DeepSpeed pipeline engine, checked against a plain-PyTorch reference.

Each launch runs tests/workers/optim_worker.py: the engine trains the small model while every rank
replays the same global batches on a full reference model (fp32 Muon formula = torch.optim.Muon's
algorithm, torch.optim.AdamW, the same clipping). The checks catch DeepSpeed's silent fallbacks:
Muon acting as SGD or Adam (the update's singular values would not sit in the Newton-Schulz band),
no orthogonalisation (same), Muon routed by name onto the embedding/head (Adam checks fail), the
clip landing on the orthogonalised update (the update would be ~40x too small), stage-local clip
norms (the second step would drift from the reference).

fp32 launches use `muon_ns_method=gram`. DeepSpeed runs Gram Newton-Schulz in fp16 where oneDNN has
fp16 kernels (CPUs with AVX512-FP16 / AMX-FP16, e.g. Sapphire Rapids) and in fp32 elsewhere
(`original_muon.ns_compute_dtype`). fp16 NS is chaotic in its rounding (measured here: a 1e-6
relative change of the gradient moves the update by up to 2%), so no tight engine-vs-reference
check can hold there. The engine launches therefore pin the fp32 path with ONEDNN_MAX_CPU_ISA=AVX2
(oneDNN then reports no fp16 kernels), and must match the fp32 formula to float rounding on every
CPU; `test_deepspeed_gram_newton_schulz_in_each_dtype` checks the fp16 path's property
(orthogonalised, close to the fp32 update) on any CPU by running DeepSpeed's function in fp16. bf16 launches use
the default `standard` method (bf16 Newton-Schulz, like torch.optim.Muon) and bf16 gradients, so
they are compared loosely. torch.compile is switched off in the workers: DeepSpeed compiles
`muon_update` per matrix shape, ~40 s on 2 cores; a compiled run gave the same losses to 4 decimals.
"""
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, launch
from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config
from resbm_ds.optim import build_optimizer, muon_matrices
from resbm_ds.model.layers import TransformerBlock
from resbm_ds.model.pipeline import layer_specs
from resbm_ds import spectrum

from optim_worker import ReferenceMuon, newton_schulz5

SMALL = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
         "model.max_seq_len=32", "data.seq_len=32", "bottleneck.ratio=8",
         "bottleneck.init=normal",   # every parameter gets a gradient at step 0 (check_adam_style)
         "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=4"]
MUON = ["train.optimizer=muon", "train.muon_weight_decay=0.1"]   # decay on, so it is checked too
GRAM = ["train.muon_ns_method=gram"]
ZERO1 = ["deepspeed.zero_optimization.stage=1"]
BF16 = ["deepspeed.bf16.enabled=true"]
NO_CLIP = ["deepspeed.gradient_clipping=0"]
NS_BAND = (0.6, 1.25)   # NS5 with Keller Jordan's coefficients leaves singular values in ~[0.68, 1.2]
TIGHT = 5e-4            # fp32 engine vs fp32 reference, relative (measured <= 2e-5)
# fp32 Gram NS on every CPU (see the module docstring); the bf16 launches are unaffected (bf16 NS).
WORKER_ENV = {"TORCH_COMPILE_DISABLE": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}
FP16_NS_REL, FP16_NS_COS = 0.2, 0.97   # fp16 vs fp32 update (measured: rel <= 0.12, cos >= 0.99)


def run_worker(tmp_path: Path, name: str, nprocs: int, steps: int, overrides, save=None):
    out = tmp_path / name
    args = [str(REPO / "tests" / "workers" / "optim_worker.py"), str(out), str(steps), *SMALL, *overrides]
    if save:
        args.append(f"--save={save}")
    launch(args, nprocs, env=WORKER_ENV)
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(nprocs)]


def params(reports, kind):
    """(name, check) of every parameter of the given kind, over all ranks."""
    return [(n, c) for r in reports for n, c in r["checks"].items() if c["kind"] == kind]


def check_routing(reports):
    for name, c in params(reports, "muon") + params(reports, "adam"):
        assert c["use_muon"] == (c["kind"] == "muon"), name
    names = {n for r in reports for n in r["checks"]}
    assert "0.weight" in names and "8.lm_head.weight" in names   # embedding and head are on AdamW...
    muon_names = {n for n, _ in params(reports, "muon")}
    assert not muon_names & {"0.weight", "8.lm_head.weight"}    # ...although DeepSpeed's name rule says Muon
    assert "3.proj.weight" in muon_names and "4.proj.weight" in muon_names   # bottleneck encoder/decoder
    assert len(muon_names) == 4 * 7 + 2


def check_muon_orthogonalised(reports):
    """First step: the update / (lr * sqrt(max(1, rows/cols))) has its top singular values in the NS band."""
    for name, c in params(reports, "muon"):
        top = c["sv"][:min(8, len(c["sv"]))]
        assert NS_BAND[0] < min(top) and max(top) < NS_BAND[1], (name, top)


def check_adam_style(reports):
    """First AdamW step: |update| = lr for every element that had a gradient."""
    for name, c in params(reports, "adam"):
        assert c["moved"] > 0 and c["adam_unit_frac"] > 0.9, (name, c)   # measured >= 0.96


def check_matches_reference(reports, tol, steps=(0, 1)):
    for name, c in params(reports, "muon") + params(reports, "adam"):
        for s in steps:
            assert c[f"rel_err{s}"] < tol, (name, s, c[f"rel_err{s}"])


def check_matches_torch_muon(reports, median_tol, max_tol):
    """torch.optim.Muon on the same gradient; it runs Newton-Schulz in bf16, whose rounding the
    iteration amplifies along the gradient's small singular directions (measured: 1.3% on a random
    gradient, up to 19% on these low-rank ones), hence the median/max bounds."""
    errs = [c["rel_err_torch_muon"] for _, c in params(reports, "muon")]
    assert statistics.median(errs) < median_tol and max(errs) < max_tol, sorted(errs)


def falling(losses):
    return losses[-1] < losses[0] - 0.3


# ---- launches -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("optim")


@pytest.fixture(scope="module")
def two_stage_muon(tmp):
    """2 stages, fp32, ZeRO-0, gradient clipping 1.0 (the engine calls MuonWithAuxAdam on 2-D weights)."""
    return run_worker(tmp, "pp2", 2, 2, [*MUON, *GRAM], save=tmp / "ckpt_muon")


@pytest.fixture(scope="module")
def zero1_adamw(tmp):
    """2 stages x 2 data-parallel, ZeRO-1, fp32, AdamW with gradient clipping 1.0."""
    return run_worker(tmp, "z1_adamw", 4, 4, ZERO1, save=tmp / "ckpt_adamw")


@pytest.mark.slow
def test_one_process_fp32_muon(tmp):
    reports = run_worker(tmp, "one", 1, 2, ["pipeline.stages=1", *MUON, *GRAM])
    assert reports[0]["optimizer"] == "MuonWithAuxAdam"
    check_routing(reports)
    check_muon_orthogonalised(reports)
    check_adam_style(reports)
    check_matches_reference(reports, TIGHT)
    check_matches_torch_muon(reports, 0.15, 0.25)


@pytest.mark.slow
def test_two_stages_fp32_muon_with_clipping(two_stage_muon):
    # Both steps match: the clip norm is global over the stages (optim.count_every_stage_in_clip_norm).
    check_routing(two_stage_muon)
    check_muon_orthogonalised(two_stage_muon)
    check_adam_style(two_stage_muon)
    check_matches_reference(two_stage_muon, TIGHT)
    check_matches_torch_muon(two_stage_muon, 0.15, 0.25)


@pytest.mark.slow
def test_zero1_fp32_muon_trains(tmp):
    reports = run_worker(tmp, "z1", 4, 4, [*MUON, *GRAM, *ZERO1, *NO_CLIP])
    assert {r["optimizer"] for r in reports} == {"DeepSpeedZeroOptimizer"}   # flat shards
    check_routing(reports)
    check_muon_orthogonalised(reports)
    check_adam_style(reports)
    check_matches_reference(reports, TIGHT)
    check_matches_torch_muon(reports, 0.15, 0.25)
    for r in reports:
        assert falling(r["losses"]), r["losses"]


@pytest.mark.slow
def test_zero1_bf16_muon(tmp):
    reports = run_worker(tmp, "z1_bf16", 4, 2, [*MUON, *ZERO1, *NO_CLIP, *BF16])
    assert {r["optimizer"] for r in reports} == {"DeepSpeedZeroOptimizer"}   # not BF16_Optimizer
    check_routing(reports)
    check_muon_orthogonalised(reports)
    check_adam_style(reports)
    # bf16 gradients and bf16 Newton-Schulz: direction and size still match (measured cos >= 0.94,
    # rel <= 0.37); a clip on the update (rel ~0.98) or an SGD/Adam step would not.
    muon = params(reports, "muon")
    assert min(c["cos0"] for _, c in muon) > 0.9
    assert max(c["rel_err0"] for _, c in muon) < 0.5
    assert statistics.median(c["rel_err0"] for _, c in muon) < 0.25
    check_matches_torch_muon(reports, 0.3, 0.5)


@pytest.mark.slow
def test_zero1_fp32_adamw_trains(zero1_adamw):
    check_adam_style(zero1_adamw)
    check_matches_reference(zero1_adamw, TIGHT)
    assert all(c["use_muon"] is None for r in zero1_adamw for c in r["checks"].values())
    for r in zero1_adamw:
        assert falling(r["losses"]), r["losses"]


# ---- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key,phrase", [
    ([*MUON, *BF16], "deepspeed.zero_optimization.stage", "BF16_Optimizer"),
    ([*MUON, *ZERO1], "deepspeed.gradient_clipping", "orthogonalises the gradient before clipping"),
    ([*MUON, *ZERO1, *BF16], "deepspeed.gradient_clipping", "must be 0"),
    ([*MUON, *ZERO1, *BF16, *NO_CLIP, "deepspeed.data_types={grad_accum_dtype: fp32}"],
     "deepspeed.data_types.grad_accum_dtype", "BF16_Optimizer"),
    (["train.optimizer=lion"], "train.optimizer", "adamw"),
    ([*MUON, "train.muon_momentum=1.0"], "train.muon_momentum", "[0, 1)"),
    ([*MUON, "train.muon_ns_method=cubic"], "train.muon_ns_method", "gram"),
    ([*MUON, "train.muon_lr=0"], "train.muon_lr", "> 0"),
])
def test_refused_combinations_name_the_key(overrides, key, phrase):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides).validate(world_size=4)
    assert e.value.key == key and phrase in str(e.value)


@pytest.mark.parametrize("overrides", [
    MUON, [*MUON, *ZERO1, *NO_CLIP], [*MUON, *ZERO1, *NO_CLIP, *BF16], [*ZERO1, *BF16], BF16,
])
def test_supported_combinations_validate(overrides):
    load_config(None, overrides).validate(world_size=4)


def test_defaults_from_the_muon_literature():
    t = load_config(None, []).train
    assert (t.optimizer, t.muon_lr, t.muon_momentum, t.muon_weight_decay, t.muon_ns_method) == \
        ("adamw", 0.02, 0.95, 0.0, "standard")


# ---- routing and the reference formula (no engine) ----------------------------------------------

def test_routing_is_by_module_role():
    cfg = load_config(None, [*SMALL, *MUON, "model.attention_bias=true"])
    model = nn.Sequential(*[spec.build() for spec in layer_specs(cfg.spec)[0]])
    muon = {id(p) for p in muon_matrices(model)}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    suffixes = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    blocks = [i for i, layer in enumerate(model) if isinstance(layer, TransformerBlock)]   # BlockWithIds too
    assert names == {f"{i}.{s}" for i in blocks for s in suffixes} | {"3.proj.weight", "4.proj.weight"}
    table = model[4].tokens.weight          # the decoder's token table: an embedding, so AdamW
    assert id(table) not in muon and table.shape == (256, 64)
    opt = build_optimizer(cfg, model)
    adam_group, muon_group = opt.param_groups
    assert not adam_group["use_muon"] and muon_group["use_muon"]
    assert {id(p) for p in muon_group["params"]} == muon
    assert all(p.dim() == 2 for p in muon_group["params"])
    assert any(p.dim() == 1 and p.shape[0] == 64 for p in adam_group["params"])   # q/k/v biases, norms
    assert (muon_group["lr"], muon_group["momentum"], adam_group["lr"]) == (0.02, 0.95, 3e-3)


def test_reference_muon_is_torch_muon_in_fp32():
    """The workers' fp32 reference against torch.optim.Muon (bf16 Newton-Schulz) on random
    gradients, two steps so the Nesterov momentum is in it."""
    torch.manual_seed(0)
    for shape in [(64, 64), (192, 64), (64, 192), (8, 64)]:
        w0 = torch.randn(shape) * 0.02
        a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
        ours = ReferenceMuon([a], lr=0.02, momentum=0.95, weight_decay=0.1)
        theirs = torch.optim.Muon([b], lr=0.02, momentum=0.95, weight_decay=0.1, adjust_lr_fn="original")
        for _ in range(2):
            g = torch.randn(shape)
            a.grad, b.grad = g.clone(), g.clone()
            ours.step()
            theirs.step()
        da, db = (w0 - a.detach()), (w0 - b.detach())
        assert (da - db).norm() / db.norm() < 0.03, shape
    s = torch.linalg.svdvals(newton_schulz5(torch.randn(64, 64)))
    assert NS_BAND[0] < s.min() and s.max() < NS_BAND[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deepspeed_gram_newton_schulz_in_each_dtype(dtype, monkeypatch):
    """DeepSpeed's Gram NS in the dtype it would pick on some CPU, against the fp32 reference, on
    low-rank gradients like the test model's (rank 2..64, square, tall and wide)."""
    import deepspeed.runtime.zero.muon.original_muon as om
    monkeypatch.setattr(om, "ns_compute_dtype", lambda method="gram": dtype)
    torch.manual_seed(0)
    for shape in [(64, 64), (192, 64), (64, 192), (8, 64), (64, 8)]:
        for rank in (2, 8, 64):
            r = min(rank, *shape)
            g = torch.randn(shape[0], r) @ torch.randn(r, shape[1]) + 1e-3 * torch.randn(shape)
            with torch.compiler.set_stance("force_eager"):
                ours = om.zeropower_via_gram_newtonschulz(g, steps=5).float()
            ref = newton_schulz5(g)
            err = float((ours - ref).norm() / ref.norm())
            if dtype == torch.float32:
                assert err < 2e-4, (shape, rank, err)     # measured <= 4.2e-5
                continue
            cos = float((ours * ref).sum() / (ours.norm() * ref.norm()))
            assert err < FP16_NS_REL and cos > FP16_NS_COS, (shape, rank, err, cos)
            # orthogonalised as much as the fp32 update: the same top singular values (measured <= 0.05 apart)
            k = min(r, 8)
            gap = (torch.linalg.svdvals(ours)[:k] - torch.linalg.svdvals(ref)[:k]).abs().max()
            assert gap < 0.1, (shape, rank, float(gap))


# ---- spectrum tool ------------------------------------------------------------------------------

@pytest.mark.slow
def test_spectrum_tool(two_stage_muon, zero1_adamw, tmp, capsys):
    out = tmp / "spectrum"
    spectrum.main([str(tmp / "ckpt_muon"), str(tmp / "ckpt_adamw"), "--labels", "muon", "adamw",
                   "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    png = (out / "spectrum.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    runs = json.loads((out / "spectrum.json").read_text())["runs"]
    assert [r["label"] for r in runs] == ["muon", "adamw"] and all(r["tag"] == "t" for r in runs)
    for r in runs:
        kinds = [m["kind"] for m in r["matrices"]]
        assert set(kinds) == set(spectrum.KINDS)
        assert all(kinds.count(k) == 4 for k in spectrum.KEY_KINDS.values())   # one per block
        assert kinds.count("bottleneck.encoder") == kinds.count("bottleneck.decoder") == 1
        for m in r["matrices"]:
            s = m["singular_values"]
            assert len(s) == min(m["shape"]) and s == sorted(s, reverse=True) and s[-1] > 0
    # The numbers are the checkpoint's: recompute one matrix straight from its layer file.
    q = next(m for m in runs[0]["matrices"] if m["layer"] == 1 and m["kind"] == "attn.q")
    layer1 = next((tmp / "ckpt_muon" / "t").glob("layer_01-*model_states.pt"))
    w = torch.load(layer1, weights_only=True)["self_attn.q_proj.weight"]
    assert torch.allclose(torch.tensor(q["singular_values"], dtype=torch.float64), torch.linalg.svdvals(w.double()), rtol=1e-6)
    assert q["shape"] == [64, 64] and math.isclose(q["stable_rank"], sum(x * x for x in q["singular_values"])
                                                    / q["singular_values"][0] ** 2)
