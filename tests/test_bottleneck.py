"""The boundary modules on their own: identity path, parameter count, wire dtype, gradients."""
import pytest
import torch

from resbm_ds.model.boundary import BottleneckDecoder, BottleneckEncoder, TokenTable, orthonormal_rows
from resbm_ds.config import load_config


def boundary(identity, wire="model", H=64, h=8, *extra):
    """A boundary on plain tensors (token_channel=none) unless `extra` says otherwise."""
    cfg = load_config(None, [f"model.hidden_size={H}", f"bottleneck.width={h}", f"bottleneck.identity={identity}",
                             f"bottleneck.wire_dtype={wire}", "bottleneck.token_channel=none", *extra]).validate()
    torch.manual_seed(0)
    return BottleneckEncoder(cfg.spec, 0), BottleneckDecoder(cfg.spec, 0)


def rank_h_identity(enc, x):
    """P^T P x, from the identity path alone."""
    return enc.identity.lift(enc.identity.project(x))


@pytest.mark.parametrize("identity", ["slice", "orthonormal"])
@pytest.mark.parametrize("extra", [[], ["bottleneck.decoder=mlp"]])
def test_fresh_boundary_is_the_rank_h_identity(identity, extra):
    enc, dec = boundary(identity, "model", 64, 8, *extra)
    x = 0.05 * torch.randn(2, 5, 64)          # the stream's scale at init
    y = dec(enc(x))
    assert torch.allclose(y, rank_h_identity(enc, x), atol=1e-7), (y - rank_h_identity(enc, x)).abs().max()
    assert (y - x).norm() / x.norm() > 0.5     # not the identity: only h of H directions pass


def test_fresh_boundary_with_token_channel_is_the_rank_h_identity():
    enc, dec = boundary("slice", "model", 64, 8, "bottleneck.token_channel=learned", "bottleneck.token_ids=sent",
                        "bottleneck.segments=3", "pipeline.stages=3")
    x, ids = 0.05 * torch.randn(2, 5, 64), torch.randint(0, 4096, (2, 5), dtype=torch.int16)
    y, ids_out = dec(enc((x, ids)))           # boundary 0 of 3 segments: the ids travel on
    assert torch.equal(ids_out, ids) and torch.allclose(y, rank_h_identity(enc, x), atol=1e-7)


def test_table_init_normal_starts_the_next_stream_full_rank():
    """bottleneck.table_init=normal: the boundary's output is P^T P x plus an N(0, init_std) row per
    token, so the next segment's stream starts full-rank (with `zero` it is rank h)."""
    out = {}
    for table_init in ("zero", "normal"):
        enc, dec = boundary("slice", "model", 64, 2, "bottleneck.token_channel=learned", "bottleneck.segments=2",
                            "bottleneck.token_ids=sent", f"bottleneck.table_init={table_init}")
        x, ids = 0.05 * torch.randn(3, 40, 64), torch.randint(0, 4096, (3, 40), dtype=torch.int16)
        out[table_init] = dec(enc((x, ids))).reshape(-1, 64)
        std = dec.tokens.weight.std().item()
        assert (std == 0) if table_init == "zero" else std == pytest.approx(0.02, rel=0.05)
    assert torch.linalg.matrix_rank(out["zero"]) == 2 and torch.linalg.matrix_rank(out["normal"]) == 64
    with pytest.raises(Exception, match="bottleneck.table_init"):
        load_config(None, ["bottleneck.table_init=big"]).validate()


def identity_share_of_gradient(enc, dec, x):
    """The fraction of the gradient reaching the sender's stream that comes through P (vs W_e)."""
    x = x.clone().requires_grad_(True)
    g = torch.randn(*x.shape[:-1], 64)
    (dec(enc(x)) * g).sum().backward()
    through_identity = rank_h_identity(enc, g)   # d/dx of (P^T P x . g) = P^T P g
    return float(through_identity.norm() / x.grad.norm()), float((x.grad - through_identity).norm() / x.grad.norm())


def test_at_step_0_the_identity_path_carries_the_gradient():
    x = 0.05 * torch.randn(4, 16, 64)
    share, rest = identity_share_of_gradient(*boundary("slice"), x)
    assert share == pytest.approx(1.0, abs=1e-6) and rest < 1e-6
    # The paper's N(0, init_std) init: most of the gradient takes the random projection W_e instead.
    share, rest = identity_share_of_gradient(*boundary("slice", "model", 64, 8, "bottleneck.init=normal"), x)
    assert rest > share, (share, rest)


def test_orthonormal_basis_is_orthonormal_and_seeded():
    P = orthonormal_rows(8, 64, seed=3)
    assert torch.allclose(P @ P.T, torch.eye(8), atol=1e-5)
    assert torch.equal(P, orthonormal_rows(8, 64, seed=3)) and not torch.equal(P, orthonormal_rows(8, 64, seed=4))


@pytest.mark.parametrize("identity", ["slice", "orthonormal"])
def test_identity_path_carries_a_rank_h_identity(identity):
    enc, dec = boundary(identity)
    with torch.no_grad():
        enc.proj.weight.zero_(); dec.proj.weight.zero_()
    x = torch.randn(2, 5, 64)
    b = enc(x)
    assert b.shape == (2, 5, 8)
    y = dec(b)
    # With E = D = 0 the boundary is exactly P^T P x: a projection (idempotent), of rank h.
    assert torch.allclose(dec(enc(y)), y, atol=1e-5)
    assert torch.linalg.matrix_rank(y.reshape(-1, 64)) == 8
    if identity == "slice":
        assert torch.equal(y[..., :8], x[..., :8]) and torch.all(y[..., 8:] == 0)


def test_gradient_reaches_the_sender_through_the_identity_path():
    for identity, expect_grad in [("slice", True), ("none", False)]:
        enc, dec = boundary(identity)
        with torch.no_grad():
            enc.proj.weight.zero_()
        x = torch.randn(2, 5, 64, requires_grad=True)
        dec(enc(x)).sum().backward()
        assert (x.grad is not None and x.grad.abs().sum() > 0) == expect_grad


def test_parameter_count_is_2Hh_plus_norms():
    enc, dec = boundary("slice")
    weights = enc.proj.weight.numel() + dec.proj.weight.numel()
    assert weights == 2 * 64 * 8
    assert sum(p.numel() for p in [*enc.parameters(), *dec.parameters()]) == weights + 64 + 8


def test_wire_dtype_cast_and_back():
    enc, dec = boundary("slice", wire="bf16")
    x = torch.randn(2, 5, 64, requires_grad=True)
    b = enc(x)
    assert b.dtype == torch.bfloat16 and b.element_size() == 2
    b.retain_grad()
    y = dec(b)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert b.grad.dtype == torch.bfloat16   # the gradient that crosses back is in the wire dtype too


def test_identity_none_ablation_is_not_a_dead_boundary():
    """identity=none has nothing to start from, so its default init is N(0, init_std): a zero W_e and
    W_d would get no gradient at all and the boundary would stay zero for the whole run."""
    enc, dec = boundary("none")
    assert enc.proj.weight.abs().sum() > 0 and dec.proj.weight.abs().sum() > 0
    x = torch.randn(2, 5, 64, requires_grad=True)
    dec(enc(x)).square().sum().backward()
    assert enc.proj.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def hashed_table(boundary_id, V, buckets, *extra):
    cfg = load_config(None, [f"model.vocab_size={V}", "model.hidden_size=64", "bottleneck.token_channel=hashed",
                             f"bottleneck.token_buckets={buckets}", *extra]).validate()
    return TokenTable(cfg.spec, boundary_id)


def test_hashed_token_table_is_B_by_H_whatever_the_vocabulary():
    """Its size is token_buckets x H at any V above it; every row is used; an id always reads the same
    row, and two boundaries hash differently (ids that share a row at one rarely do at the other). A
    vocabulary that fits gets one row per id, read at the id (no collisions)."""
    for V in (256, 128_256):
        t = hashed_table(0, V, 97)
        assert [tuple(p.shape) for p in t.parameters()] == [(97, 64)]
    small = hashed_table(0, 50, 97)
    assert [tuple(p.shape) for p in small.parameters()] == [(50, 64)]
    assert torch.equal(small.rows(torch.arange(50)), torch.arange(50))
    ids = torch.arange(128_256)
    rows0, rows1 = hashed_table(0, 128_256, 97).rows(ids), hashed_table(1, 128_256, 97).rows(ids)
    assert rows0.min() == 0 and rows0.max() == 96 and rows0.unique().numel() == 97
    counts = torch.bincount(rows0, minlength=97).float()
    assert counts.max() / counts.mean() < 1.1                     # a near-even spread over the rows
    assert torch.equal(hashed_table(0, 128_256, 97).rows(ids), rows0)   # the seed fixes the hash
    shared0 = rows0[:500, None] == rows0[None, :500]
    shared1 = rows1[:500, None] == rows1[None, :500]
    both = (shared0 & shared1).sum() - 500                         # pairs colliding at both boundaries
    assert both < 0.1 * (shared0.sum() - 500), (both, shared0.sum())
    assert not torch.equal(hashed_table(0, 128_256, 97, "seed=7").rows(ids), rows0)


def test_hashed_token_table_learns_only_the_rows_it_reads():
    t = hashed_table(0, 4096, 64, "bottleneck.init=normal")
    ids = torch.tensor([[3, 3, 4000], [17, 3, 4000]], dtype=torch.int16)
    out = t(ids)
    assert torch.equal(out[0, 0], t.weight[t.rows(torch.tensor(3))])
    out.sum().backward()
    touched = t.weight.grad.abs().sum(1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(set(t.rows(ids).flatten().tolist()))
