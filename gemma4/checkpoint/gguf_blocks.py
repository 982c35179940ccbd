"""GGUF's quantised blocks to our weight formats (quant/formats.py), at load.

Q4_0, Q4_1 (int4 g32), Q4_K (int4 g256), Q8_0, Q5_0, Q5_1 (int8 g32, GGUF's f16 scales kept) and Q6_K
(int6) convert losslessly; other quantised types are dequantised by the `gguf` package and re-quantised
to int8 g32. The numpy converters below read the memory-mapped blocks and are the reference; Q4_K and
Q6_K, most of a big model's bytes, go through the native converters (gemma4.native, gguf_blocks.cpp),
which give the same bytes ~10x faster, where the kernels are built.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..native import compiled
from ..quant.formats import QuantWeight, pack6, quantize_int8
from .gguf_file import GGMLQuantizationType as T

LOSSLESS = (T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0, T.Q5_0, T.Q5_1, T.Q6_K)


def from_gguf(raw: np.ndarray, qtype: T, shape: tuple[int, ...]) -> QuantWeight | None:
    """A quantised GGUF matrix as a QuantWeight; None for types we do not convert (F32, F16, BF16).

    `raw` holds the tensor's packed blocks, rows of bytes ([..., N, bytes per row]).
    """
    *lead, n, k = shape
    rows = int(np.prod(shape[:-1]))
    b = np.ascontiguousarray(raw).reshape(rows, -1)
    conv = _CONVERTERS.get(qtype)
    if conv is None:
        if qtype in (T.F32, T.F16, T.BF16):
            return None
        from gguf.quants import dequantize  # lossy fallback: dequantise, then int8 g32

        w = torch.from_numpy(np.asarray(dequantize(b, qtype), dtype=np.float32).reshape(shape))
        return quantize_int8(w)
    native = _native_converter(qtype, b)
    if native is not None:  # the same bytes as conv, ~10x faster (most of a big model's load)
        bits, group, *arrays = native(k)
        shaped = lambda a: None if a is None else a.reshape(*lead, n, -1)
        return QuantWeight(bits, group, *map(shaped, arrays))
    bits, group, *arrays = conv(b, k)
    shaped = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).reshape(*lead, n, -1)
    return QuantWeight(bits, group, *map(shaped, arrays))


def _native_converter(qtype: T, b: np.ndarray):
    """The compiled converter of Q4_K or Q6_K rows b [rows, bytes] (a function of k), or None."""
    if qtype not in (T.Q4_K, T.Q6_K):
        return None
    kernel = compiled()
    if kernel is None:
        return None
    with warnings.catch_warnings():  # a read-only memory map: the converter only reads it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(b)
    if qtype == T.Q4_K:
        return lambda k: (4, 256, *kernel.gguf_q4_k(raw, k))

    def q6_k(k):
        q, d, sub = kernel.gguf_q6_k(raw, k)
        return 6, 256, q, d, None, sub

    return q6_k


def _blocks(b: np.ndarray, k: int, block: int, size: int) -> np.ndarray:
    return b.reshape(b.shape[0], k // block, size)


def _f16(a: np.ndarray) -> np.ndarray:
    return _half(a).astype(np.float32)


def _half(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16)[..., 0]


def _q8_0(b, k):
    blk = _blocks(b, k, 32, 34)
    return 8, 32, blk[..., 2:].view(np.int8).reshape(b.shape[0], k), _half(blk[..., :2]), None


def _q4_0(b, k):
    blk = _blocks(b, k, 32, 18)
    d = _f16(blk[..., :2])
    return 4, 32, blk[..., 2:].reshape(b.shape[0], k // 2), d, -8 * d


def _q4_1(b, k):
    blk = _blocks(b, k, 32, 20)
    return 4, 32, blk[..., 4:].reshape(b.shape[0], k // 2), _f16(blk[..., :2]), _f16(blk[..., 2:4])


def _five_bits(qh_bytes: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5 blocks: 4 low bits in nibbles (j low, j + 16 high), the fifth bit of element j in bit j of qh.
    (Held as int8: a 5-bit layout measured slower here, its decoding costing more than the bytes it saves.)"""
    # Written into one array (no 32-bit temporaries, no concatenation): the load of a big model runs this.
    hbits = np.unpackbits(np.ascontiguousarray(qh_bytes), axis=-1, bitorder="little")  # [rows, blocks, 32]
    out = np.empty(qs.shape[:-1] + (32,), np.uint8)
    np.bitwise_and(qs, 15, out=out[..., :16])
    np.right_shift(qs, 4, out=out[..., 16:])
    out |= hbits << 4
    return out


def _q5_0(b, k):
    blk = _blocks(b, k, 32, 22)
    q = _five_bits(blk[..., 2:6], blk[..., 6:]).astype(np.int8) - np.int8(16)
    return 8, 32, q.reshape(b.shape[0], k), _half(blk[..., :2]), None


def _q5_1(b, k):
    blk = _blocks(b, k, 32, 24)
    q = _five_bits(blk[..., 4:8], blk[..., 8:]).astype(np.int8)
    return 8, 32, q.reshape(b.shape[0], k), _half(blk[..., :2]), _half(blk[..., 2:4])


def _q4_k(b, k):
    blk = _blocks(b, k, 256, 144)
    d, dmin = _f16(blk[..., 0:2]), _f16(blk[..., 2:4])
    s = blk[..., 4:16].astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    m = np.empty_like(sc)
    sc[..., :4], m[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sub = np.empty(sc.shape + (2,), np.int8)  # [rows, sb, 8 blocks, (sc, m)], 0..63
    sub[..., 0], sub[..., 1] = sc, m
    # 4 chunks of 32 bytes: low nibbles are sub-block 2j, high nibbles 2j+1; repack per 32-group
    # (element i | element i + 16 in a byte), written in place: no stacked temporaries.
    qs = blk[..., 16:].reshape(*blk.shape[:-1], 4, 32)
    packed = np.empty(qs.shape[:-1] + (2, 16), np.uint8)  # [rows, sb, 4, (2j, 2j+1), 16]
    lo, hi = qs[..., :16], qs[..., 16:]
    np.bitwise_and(lo, 15, out=packed[..., 0, :])
    packed[..., 0, :] |= (hi & 15) << 4
    np.right_shift(lo, 4, out=packed[..., 1, :])
    packed[..., 1, :] |= hi & 0xF0
    return (4, 256, packed.reshape(b.shape[0], k // 2), d.reshape(b.shape[0], -1), -dmin.reshape(b.shape[0], -1),
            sub.reshape(b.shape[0], -1))


def _q6_k(b, k):
    rows = b.shape[0]
    q = np.empty((rows, k * 3 // 4), np.uint8)
    step = max(1, (1 << 24) // k)  # rows per chunk: the temporaries stay ~100 MB on a 262144-row head
    for r in range(0, rows, step):
        blk = _blocks(b[r:r + step], k, 256, 210)
        ql = blk[..., :128].reshape(*blk.shape[:-1], 2, 64)
        qh = blk[..., 128:192].reshape(*blk.shape[:-1], 2, 32)
        low = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)
        high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-2)
        c = (low | (high << 4)).reshape(blk.shape[0], k)  # codes 0..63 in element order
        q[r:r + step] = pack6(torch.from_numpy(c)).numpy()
    blk = _blocks(b, k, 256, 210)
    sub = np.ascontiguousarray(blk[..., 192:208]).view(np.int8).reshape(rows, -1)
    return 6, 256, q, _f16(blk[..., 208:210]).reshape(rows, -1), None, sub


_CONVERTERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q4_K: _q4_k, T.Q6_K: _q6_k}
