"""Bytes on the wire between pipeline stages: the one dtype table and the one set of formulas.

Every byte count the package predicts comes from here: a codec's row (`codec_row_bytes`, which the
codecs' payload shape also uses, wire/codecs.py), a token id (`id_wire_bytes`, int16 where the
vocabulary fits), a boundary's (forward, backward) bytes per token (`boundary_bytes_per_token`,
behind `Config.wire_bytes_per_token`, which tests/test_wire_bytes.py checks against the meter) and
a dense boundary's (`dense_bytes_per_token`). Plain numbers in, numbers out: the config supplies
the widths and dtypes (`Config`, `ModelSpec`), the wire and model layers the tensors.
"""
from __future__ import annotations

import torch

# The one dtype table: names in configs -> torch dtypes (bytes: `.itemsize`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DENSE_REFERENCE = "bf16"     # headline ratios compare with a dense bf16 boundary, as the paper's do
INT16_MAX_VOCAB = 2 ** 15             # ids below this cross as int16, larger vocabularies as int32
CODEC_SCALE_BYTES = 2                 # a codec's per-token scale (bf16; wire/codecs.py)
CODEC_BITS = {"int8": 8, "fp8": 8, "int4": 4, "int2": 2}   # bits per code value of each wire codec


def codec_row_bytes(width: int, codec: str) -> int:
    """Bytes on the wire for one row (one token) of `width` values under a wire codec: the values
    packed (two 4-bit / four 2-bit values a byte, the last byte padded), then the row's scale. The
    one formula behind `Config.wire_bytes_per_token` and the codecs' payload shape (wire/codecs.py)."""
    return -(-width * CODEC_BITS[codec] // 8) + CODEC_SCALE_BYTES


def id_wire_bytes(vocab_size: int) -> int:
    """Bytes per token id on the wire: int16 where the vocabulary fits, else int32."""
    return 2 if vocab_size <= INT16_MAX_VOCAB else 4


def id_dtype(vocab_size: int) -> torch.dtype:
    """The token ids' dtype on the wire: `id_wire_bytes` wide."""
    return torch.int16 if id_wire_bytes(vocab_size) == 2 else torch.int32


def boundary_bytes_per_token(width: int, elem_bytes: int, codec: str = "none", codec_backward: bool = False,
                             id_bytes: int = 0) -> tuple[int, int]:
    """(forward, backward) bytes per token at a boundary that crosses stages, as the meter counts
    them: the code (`width` values of `elem_bytes`, or under a wire codec `codec_row_bytes`), plus
    `id_bytes` of token ids forward where they cross (no gradient comes back for them)."""
    dense_code = width * elem_bytes
    coded = codec_row_bytes(width, codec) if codec != "none" else dense_code
    return coded + id_bytes, (coded if codec_backward else dense_code)


def dense_bytes_per_token(hidden_size: int, reference: str, model_elem_bytes: int) -> int:
    """Bytes per token per direction of an uncompressed boundary: H values in `reference` ("model" =
    the model's own dtype, `model_elem_bytes` wide)."""
    return hidden_size * (DTYPES[reference].itemsize if reference in DTYPES else model_elem_bytes)
