"""Baseline boundary methods (bottleneck-noskip, subspace): modules on their own, then through the
real DeepSpeed pipeline in several processes, with the bytes on the wire checked against the formula."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import run_pipe_worker, run_pipe_worker_cases
from resbm_ds.model.baselines import (NoSkipDecoder, NoSkipEncoder, SubspaceBlock, SubspaceDecoder, SubspaceEmbedding,
                                SubspaceLinear, off_subspace)
from resbm_ds.model.boundary import BottleneckDecoder, BottleneckEncoder
from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config
from resbm_ds.model.layers import TransformerBlock, lm_loss
from resbm_ds.optim import build_optimizer, muon_matrices
from resbm_ds.model.pipeline import layer_specs, stage_parts

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

SMALL = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=4", "model.num_heads=4",
         "model.max_seq_len=32", "data.seq_len=32", "bottleneck.ratio=8",
         "deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.gradient_accumulation_steps=4"]
MB, T, GAS, H, V = 4, 32, 4, 64, 256
K = H // 8   # h or k
STEPS = 6


def config(method, *extra):
    return load_config(None, [*SMALL, f"bottleneck.method={method}", *extra]).validate()


def build_layers(cfg):
    specs, segment_ends = layer_specs(cfg.spec)
    torch.manual_seed(0)
    return nn.ModuleList(spec.build() for spec in specs), segment_ends


def run_layers(layers, ids):
    """Every layer's output in order (layer i's output is outs[i])."""
    outs, x = [], ids
    for layer in layers:
        x = layer(x)
        outs.append(x)
    return outs


def falling(losses):
    return losses[-1] < losses[0] - 0.05


# ---- config ------------------------------------------------------------------------------------

def test_wire_bytes_and_compression_ratio_count_what_crosses():
    noskip = config("bottleneck-noskip")
    assert noskip.code_width == K and noskip.wire_bytes_per_token == (4 * K, 4 * K)
    assert noskip.compression_ratio("model") == H / K
    sub = config("subspace")
    # k floats + one int16 id forward (V=256 fits), the k-float gradient backward
    assert sub.code_width == K and sub.wire_bytes_per_token == (4 * K + 2, 4 * K)
    assert sub.compression_ratio("model") == 4 * H / (4 * K + 2)
    bf16 = config("subspace", "deepspeed.bf16.enabled=true")
    assert bf16.wire_bytes_per_token == (2 * K + 2, 2 * K) and bf16.compression_ratio() == 2 * H / (2 * K + 2)
    assert config("subspace", "bottleneck.wire_dtype=bf16").wire_bytes_per_token == (2 * K + 2, 2 * K)
    # REFERENCE 2: H=4096, k=40 is "4096/41 with the id channel" in fp32 with int32 ids (V > 32768)
    big = load_config(None, ["model.hidden_size=4096", "model.num_heads=32", "bottleneck.method=subspace",
                             "model.vocab_size=50000", "bottleneck.width=40"]).validate()
    assert big.compression_ratio("model") == 4096 / 41
    resbm = config("resbm", "bottleneck.token_channel=none")
    assert resbm.compression_ratio("model") == H / K and config("none").compression_ratio("model") == 1
    assert config("resbm").compression_ratio("model") == H / K                 # the default reads the ids locally
    assert config("resbm", "bottleneck.token_ids=sent").compression_ratio("model") == 4 * H / (4 * K + 2)   # int16


@pytest.mark.parametrize("overrides,key,phrase", [
    (["bottleneck.method=subspace", "model.tie_embeddings=true"], "model.tie_embeddings", "untied"),
    (["bottleneck.method=subspace", "bottleneck.segments=1", "pipeline.stages=1"], "bottleneck.segments", ">= 2"),
    (["bottleneck.method=subspace", "model.init_from_hf=/x"], "model.init_from_hf", "subspace"),
    (["bottleneck.method=subspace", "bottleneck.width=64"], "bottleneck.width", "< model.hidden_size"),
    (["bottleneck.method=bottleneck-noskip", "bottleneck.ratio=3"], "bottleneck.ratio", "divide"),
])
def test_invalid_baseline_configs(overrides, key, phrase):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*SMALL, *overrides]).validate()
    assert e.value.key == key and phrase in str(e.value)


@pytest.mark.parametrize("method", ["bottleneck-noskip", "subspace"])
def test_same_layout_and_stage_cuts_right_after_each_encoder(method):
    cfg = config(method, "bottleneck.segments=4")
    specs, _ = layer_specs(cfg.spec)
    names = [s.typename.__name__ for s in specs]
    enc, dec = ("SubspaceEncoder", "SubspaceDecoder") if method == "subspace" else ("NoSkipEncoder", "NoSkipDecoder")
    assert names.count(enc) == names.count(dec) == 3
    for S in (1, 2, 4):
        parts = stage_parts(cfg.spec, S)
        assert parts[0] == 0 and parts[-1] == len(specs)
        for cut in parts[1:-1]:
            assert names[cut - 1] == enc and names[cut] == dec
    if method == "subspace":   # constrained blocks up to the last boundary, then an ordinary segment
        last_dec = max(i for i, n in enumerate(names) if n == dec)
        assert names[0] == "SubspaceEmbedding"
        assert all(n != "TransformerBlock" for n in names[:last_dec])
        assert names[last_dec + 1:] == ["TransformerBlock", "FinalNorm", "LMHead"]


# ---- subspace at module level --------------------------------------------------------------------

def subspace_layers(*extra):
    cfg = config("subspace", *extra)
    layers, ends = build_layers(cfg)
    return cfg, layers, ends


def constrained_linears(layers):
    return [m for m in layers.modules() if isinstance(m, SubspaceLinear)]


def test_one_orthonormal_basis_shared_by_every_layer():
    _, layers, _ = subspace_layers("bottleneck.segments=4")
    bases = [m.basis for m in layers.modules() if isinstance(getattr(m, "basis", None), torch.Tensor)]
    assert len(bases) > 10
    U = bases[0]
    assert U.shape == (H, K) and torch.allclose(U.T @ U, torch.eye(K), atol=1e-5)
    assert all(torch.equal(U, b) for b in bases)
    tables = [m.fixed for m in layers.modules() if isinstance(m, (SubspaceEmbedding, SubspaceDecoder))]
    assert all(torch.equal(tables[0], t) for t in tables) and torch.linalg.matrix_rank(tables[0]) == H
    assert not any(p.requires_grad for m in layers.modules() for p in m.buffers())


def test_counting_on_the_meta_device_first_leaves_the_real_model_on_the_cpu():
    """`--dry-run` counts the model under torch.device("meta"); the shared basis and table it builds
    on the way are cached, and the real model built next in the same process must get CPU tensors."""
    from resbm_ds.model.accounting import parameter_counts
    from resbm_ds.model import baselines
    baselines._basis.cache_clear()
    baselines._table.cache_clear()
    cfg = config("subspace", "bottleneck.segments=4", "seed=4321")
    parameter_counts(cfg.spec, cfg.pipeline.stages)
    _, layers, _ = subspace_layers("bottleneck.segments=4", "seed=4321")
    tensors = [t for m in layers.modules() for t in m.buffers()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def check_boundaries_reconstruct(layers, ends, ids, tol=1e-5):
    outs = run_layers(layers, ids)
    emb = layers[0]
    for end in ends[:-1]:   # encoder = layer end-1, decoder = layer end
        x, wire_ids = outs[end - 2]
        assert wire_ids.dtype == torch.int16 and torch.equal(wire_ids, ids.short())   # V=256 fits int16
        assert off_subspace((x - emb.fixed[ids]).reshape(-1, H).T, emb.basis) < 1e-6
        code, _ = outs[end - 1]
        assert code.shape == (*ids.shape, K)
        rebuilt = outs[end][0] if isinstance(outs[end], tuple) else outs[end]
        err = (rebuilt - x).abs().max() / x.abs().max()
        assert err < tol, err
    return outs


def test_subspace_encoder_then_decoder_is_the_identity_on_the_models_stream():
    _, layers, ends = subspace_layers("bottleneck.segments=4")
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        outs = check_boundaries_reconstruct(layers, ends, ids)
    assert outs[-1].shape == (2, T, V)
    # ... and only there: an arbitrary hidden state loses what lies outside F[tok] + span(U)
    enc, dec = layers[ends[0] - 1], layers[ends[0]]
    x = torch.randn(2, T, H)
    assert (dec(enc((x, ids.int())))[0] - x).abs().max() > 0.1


def test_subspace_outputs_stay_in_span_after_optimizer_steps():
    cfg, layers, ends = subspace_layers("train.lr=0.05", "train.weight_decay=0.1")
    U = layers[0].basis
    linears = constrained_linears(layers)
    assert len(linears) == 4   # o_proj and down_proj of the 2 blocks of the first segment
    # optimizer routing: Z is an nn.Linear weight (decayed; a hidden matrix for Muon)
    muon = {id(p) for p in muon_matrices(layers)}
    assert all(id(m.weight) in muon for m in linears) and id(layers[0].weight) not in muon
    before = [m.weight.detach().clone() for m in linears] + [layers[0].weight.detach().clone()]
    ids = torch.randint(0, V, (2, T))
    for opt in (build_optimizer(cfg, layers),                                  # AdamW, weight decay
                torch.optim.SGD(layers.parameters(), lr=0.5, momentum=0.9)):   # any optimizer
        for _ in range(3):
            opt.zero_grad()
            lm_loss(run_layers(layers, ids[:, :-1])[-1], ids[:, 1:]).backward()
            opt.step()
    after = [m.weight for m in linears] + [layers[0].weight]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(after, before))   # they did train
    for m in linears:
        assert off_subspace(m.full_weight, U) < 1e-6
    assert off_subspace(layers[0].full_weight, U) < 1e-6
    # the unconstrained last segment is not in span(U): the check measures something
    plain = [b for b in layers if isinstance(b, TransformerBlock) and not isinstance(b, SubspaceBlock)]
    assert off_subspace(plain[0].self_attn.o_proj.weight, U) > 0.5
    # the sublayer outputs themselves, and the boundary still reconstructs exactly
    y = linears[0](torch.randn(3, linears[0].in_features))
    assert off_subspace(y.T, U) < 1e-6
    with torch.no_grad():
        check_boundaries_reconstruct(layers, ends, ids)


# ---- bottleneck-noskip at module level -----------------------------------------------------------

def test_noskip_is_swarm_shaped_and_has_no_identity_path():
    cfg = config("bottleneck-noskip", "bottleneck.identity=orthonormal")   # identity is ignored
    torch.manual_seed(0)
    enc, dec = NoSkipEncoder(cfg.spec, 0), NoSkipDecoder(cfg.spec, 0)
    assert enc.identity is None and dec.identity is None
    assert isinstance(enc.norm, nn.LayerNorm) and isinstance(dec.norm, nn.LayerNorm)
    assert enc.proj.weight.shape == (K, H) and enc.proj.bias is not None and dec.proj.weight.shape == (H, K)
    assert not any("basis" in n for n, _ in [*enc.named_buffers(), *dec.named_buffers()])
    assert {id(enc.proj.weight), id(dec.proj.weight)} <= {id(p) for p in muon_matrices(nn.ModuleList([enc, dec]))}

    x = torch.randn(2, 5, H, requires_grad=True)
    b = enc(x)
    assert b.shape == (2, 5, K)
    dec(b).square().sum().backward()
    assert x.grad.abs().sum() > 0
    # With W_e = 0 nothing of x reaches the receiver and no gradient reaches the sender: every
    # path from the sender's input to the code goes through W_e.
    with torch.no_grad():
        enc.proj.weight.zero_()
    x.grad = None
    y = dec(enc(x))
    y.square().sum().backward()
    assert torch.count_nonzero(x.grad) == 0
    assert torch.allclose(y, dec(enc(torch.randn(2, 5, H))))
    # contrast: ResBM's identity path carries a gradient with W_e = 0 (test_bottleneck.py)
    rcfg = config("resbm", "bottleneck.token_channel=none")
    renc, rdec = BottleneckEncoder(rcfg.spec, 0), BottleneckDecoder(rcfg.spec, 0)
    with torch.no_grad():
        renc.proj.weight.zero_()
    x.grad = None
    rdec(renc(x)).square().sum().backward()
    assert x.grad.abs().sum() > 0


def test_wire_meter_counts_integer_side_tensors_but_not_the_handshake(monkeypatch):
    from deepspeed.runtime.pipe import p2p

    from resbm_ds.wire.chain import Transfer
    from resbm_ds.wire.meter import WireMeter

    monkeypatch.setattr(p2p, "_grid", SimpleNamespace(get_stage_id=lambda: 0), raising=False)
    meter = WireMeter()

    def send(x):
        meter.on_send(x, Transfer.of(x, 1, sending=True))

    send(torch.zeros(256, dtype=torch.int32))                           # shape handshake
    assert meter.take().sends == 0
    send(torch.zeros(MB, T, K))                                         # the code
    send(torch.zeros(MB, T, dtype=torch.int32))                         # the token ids
    grad = torch.zeros(MB, T, K)                                        # its gradient
    meter.on_recv(grad, grad, Transfer.of(grad, 1, sending=False))
    c = meter.take()
    assert (c.sent_fwd, c.recv_bwd, c.sends) == (MB * T * (4 * K + 4), MB * T * 4 * K, 2)


# ---- through the DeepSpeed pipeline, 2 stages over gloo ------------------------------------------

def per_step(bytes_per_token):
    return GAS * MB * T * bytes_per_token


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """This file's 2-stage runs, one after another in one launch (a fresh engine each)."""
    return run_pipe_worker_cases(tmp_path_factory.mktemp("baselines"), 2, STEPS, {
        "subspace": [*SMALL, "bottleneck.method=subspace"],
        "subspace_bf16": [*SMALL, "bottleneck.method=subspace", "deepspeed.bf16.enabled=true"],
        "noskip": [*SMALL, "bottleneck.method=bottleneck-noskip"],
    })


@pytest.fixture(scope="module")
def subspace_two_stage(two_stage):
    return two_stage["subspace"]


def test_subspace_trains_through_two_stages_sending_code_and_ids(subspace_two_stage):
    s0, s1 = subspace_two_stage
    assert s0["local_layers"] == ["SubspaceEmbedding", "SubspaceBlock", "SubspaceBlock", "SubspaceEncoder"]
    assert s1["local_layers"] == ["SubspaceDecoder", "TransformerBlock", "TransformerBlock", "FinalNorm", "LMHead"]
    assert falling(s1["losses"]), s1["losses"]
    assert s0["code_width"] == K and s0["compression_ratio"] == 4 * H / (4 * K + 2)
    fwd, bwd = per_step(4 * K + 2), per_step(4 * K)   # k fp32 + an int16 id forward; k fp32 back
    assert fwd == per_step(config("subspace").wire_bytes_per_token[0])
    for w0, w1 in zip(s0["wire"], s1["wire"]):
        assert w0["sent_fwd"] == w1["recv_fwd"] == fwd
        assert w1["sent_bwd"] == w0["recv_bwd"] == bwd
        assert w0["sent_bwd"] == w1["sent_fwd"] == 0
        assert w0["sends"] == 2 * GAS and w1["sends"] == GAS   # (code, ids) forward; the code's gradient back


def test_subspace_one_process_matches_two_stages(subspace_two_stage, tmp_path):
    s0, _ = subspace_two_stage
    (one,) = run_pipe_worker(tmp_path, 1, STEPS, ["pipeline.stages=1", *SMALL, "bottleneck.method=subspace"])
    assert all(w["sent_fwd"] == w["recv_bwd"] == 0 for w in one["wire"])
    # Same model, seed and data; only float summation order may differ (measured: 0 and 1e-7 relative).
    worst = max(abs(a - b) / abs(b) for a, b in zip(one["losses"], s0["losses"]))
    assert worst < 1e-5, (worst, one["losses"], s0["losses"])


def test_subspace_bf16_sends_bf16_code_and_int16_ids(two_stage):
    s0, s1 = two_stage["subspace_bf16"]
    assert s0["param_dtypes"] == ["torch.bfloat16"]
    assert falling(s1["losses"]), s1["losses"]
    assert s0["wire"][-1]["sent_fwd"] == per_step(2 * K + 2) and s1["wire"][-1]["sent_bwd"] == per_step(2 * K)
    assert s0["compression_ratio"] == 2 * H / (2 * K + 2)


def test_noskip_trains_through_two_stages_sending_only_the_code(two_stage):
    s0, s1 = two_stage["noskip"]
    assert s0["local_layers"][-1] == "NoSkipEncoder" and s1["local_layers"][0] == "NoSkipDecoder"
    assert falling(s1["losses"]), s1["losses"]
    assert s0["compression_ratio"] == H / K
    for w0, w1 in zip(s0["wire"], s1["wire"]):
        assert w0["sent_fwd"] == w1["recv_fwd"] == per_step(4 * K)
        assert w1["sent_bwd"] == w0["recv_bwd"] == per_step(4 * K)
        assert w0["sends"] == w1["sends"] == GAS
