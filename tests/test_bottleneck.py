"""The boundary modules on their own: identity path, parameter count, wire dtype, gradients."""
import pytest
import torch

from resbm_ds.bottleneck import BottleneckDecoder, BottleneckEncoder, orthonormal_rows
from resbm_ds.config import load_config


def boundary(identity, wire="model", H=64, h=8):
    cfg = load_config(None, [f"model.hidden_size={H}", f"bottleneck.width={h}",
                             f"bottleneck.identity={identity}", f"bottleneck.wire_dtype={wire}"]).validate()
    torch.manual_seed(0)
    return BottleneckEncoder(cfg, 0), BottleneckDecoder(cfg, 0)


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
    y = dec(b)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32
