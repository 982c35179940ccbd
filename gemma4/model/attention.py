"""Attention of one decoder layer over its KV cache view (sliding ring or full).

The cache hands attention its keys and values in pieces (a ring whole; a full layer's context a few
thousand slots at a time). Each piece is scored in float32 and folded into a running softmax (the
maximum and sum of exponentials of each query, log-sum-exp style), so no temporary spans the whole
context in float32 and the stored dtype (bf16, int8) is widened one piece at a time. A context that
fits one piece (the usual case) goes through torch's fused scaled_dot_product_attention instead, and a
few queries (decode) through the native kernel, which reads a full layer's block pool in place.
K=V layers store only the values; a piece's keys are rebuilt from them (times the k_norm weight,
then RoPE on the channels whose frequency is not zero: a quarter of them under proportional RoPE).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

from ..kv import RowsView
from ..config.text import ModelConfig
from ..native.ops import attend_small, engine_attends, prefill_attention, small_attention
from ..quant.modules import Linear
from .layers import RMSNorm, rope_inv_freq, rotate

PIECE_ELEMENTS = 1 << 22  # float32 elements of one piece's scores or values (16 MiB)
PIECE_ALIGN = 256  # pieces of whole cache blocks
EXP_FLOOR = -87.0  # e^x below it is under float32's smallest normal number


def piece_slots(batch: int, heads: int, queries: int, kv_heads: int, head_dim: int) -> int:
    """Key slots per piece so that its scores [B, H, T, n] and its values [B, KV, n, D] stay within
    PIECE_ELEMENTS (never below one block)."""
    n = min(PIECE_ELEMENTS // (batch * heads * queries), PIECE_ELEMENTS // (batch * kv_heads * head_dim))
    return max(PIECE_ALIGN, n // PIECE_ALIGN * PIECE_ALIGN)


def attention_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
                   sees_until: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, S] booleans (True: attend) from absolute positions.

    A query at p sees keys p-window+1 .. p on sliding layers, 0 .. p on full ones. `sees_until` [B, T]
    moves the upper bound past p (an image's soft tokens see the whole image). As [B, T, 2] (from,
    until), it also lets the query see keys from..until whatever the window (the unified model: an
    image's tokens see one another across a window). Slots at -1 are empty; padding queries (-1) see
    nothing (their outputs are zeros, never used).
    """
    q = qpos[:, :, None]
    k = kpos[:, None, :]
    span = sees_until is not None and sees_until.dim() == 3
    until = q if sees_until is None else (sees_until[..., 1] if span else sees_until)[:, :, None]
    allowed = (k >= 0) & (k <= until)
    if window is not None:
        allowed &= (k > q - window) | (k >= sees_until[..., 0][:, :, None]) if span else k > q - window
    return allowed


def _is_causal(allowed: torch.Tensor) -> bool:
    """Whether a [B, T, S] mask is the causal one of T queries over the same T keys in order (query i
    sees keys 0..i) in every row."""
    t, s = allowed.shape[-2:]
    if t != s or t < 2:
        return False
    return bool(torch.equal(allowed, _causal(t, allowed.device).expand_as(allowed)))


_CAUSAL: dict = {}  # (T, device) -> [T, T] lower-triangular booleans


def _causal(t: int, device: torch.device) -> torch.Tensor:
    key = (t, device)
    if key not in _CAUSAL:
        if len(_CAUSAL) > 16:
            _CAUSAL.clear()
        _CAUSAL[key] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return _CAUSAL[key]


def attend(q: torch.Tensor, pieces, qpos: torch.Tensor, window: int | None, sees_until: torch.Tensor | None,
           scale: float, scores_of=None, keys_of=None, rebuild_of=None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over every piece (k, v, kpos) of the cache, in float32.

    q: [B, H, T, D]; a piece's k, v: [B, KV, S, D], kpos [B, S]. Heads h*KV/H share KV head h // (H/KV)
    (grouped-query attention): q is seen as [B, KV, (H/KV)*T, D]. A piece without keys (K=V layers) is
    scored by scores_of(v as float32, kpos) -> [B, KV, (H/KV)*T, S]; when the context is one piece and
    the queries few (decode), keys_of(v, kpos) -> [B, KV, S, D] builds its keys for the native kernel
    instead; a paged pool read in place has them rebuilt inside the kernel from rebuild_of(kpos)
    (attend_small's rebuild). Returns [B, H, T, D] float32.
    """
    b, h, t, d = q.shape
    qf = q.float()
    native = sees_until is None or sees_until.dim() == 2  # the kernel takes no (from, until) spans
    whole = pieces.paged() if hasattr(pieces, "paged") and native else None
    if whole is not None:  # a paged pool read in place by the native kernel (decode), no gathering
        k, v, blocks, kpos = whole
        if (k is not None or rebuild_of is not None) and small_attention(qf, v):
            rebuild = None if k is not None else rebuild_of(kpos)
            out = attend_small(qf, k, v, qpos, kpos, window, sees_until, scale, blocks, rebuild)
            if out is not None:
                return out
        if (k is not None or rebuild_of is not None) and engine_attends(qf, v, sees_until):
            # a prefill chunk: the matrix engine, the pool read in place
            out = prefill_attention(qf, k, v, qpos, kpos, window, sees_until, scale, blocks,
                                    None if k is not None else rebuild_of(kpos))
            if out is not None:
                return out
    pieces = iter(pieces)
    first = next(pieces)
    second = next(pieces, None)
    if (second is None and native and (first[0] is not None or rebuild_of is not None)
            and engine_attends(qf, first[1], sees_until)):  # a prefill chunk over a ring's one piece
        k, v, kpos = first
        out = prefill_attention(qf, k, v, qpos, kpos, window, sees_until, scale, None,
                                None if k is not None else rebuild_of(kpos))
        if out is not None:
            return out
    if second is None and first[0] is None and keys_of is not None and small_attention(qf, first[1]):
        first = (keys_of(first[1], first[2]), first[1].float(), first[2])  # K=V: rebuild this piece's keys
    if second is None and first[0] is not None:  # the whole context in one piece, keys stored
        k, v, kpos = first
        out = attend_small(qf, k, v, qpos, kpos, window, sees_until, scale) if native else None
        if out is not None:
            return out
        allowed = attention_mask(qpos, kpos, window, sees_until)
        if bool(allowed.any(-1).all()):  # (a query that sees nothing must give zeros, not NaN)
            # torch's fused kernel: no [T x S] temporaries per op, one pass of exp; same softmax. A mask that
            # is the plain causal one (a fresh prompt) goes as is_causal: the kernel then skips the key
            # blocks above the diagonal instead of scoring and masking them.
            causal = _is_causal(allowed)
            return F.scaled_dot_product_attention(qf, k.float(), v.float(), attn_mask=None if causal else allowed[:, None],
                                                  is_causal=causal, scale=scale, enable_gqa=k.shape[1] != h)
    return _attend_torch(qf, itertools.chain([first], [] if second is None else [second], pieces), qpos, window,
                         sees_until, scale, scores_of)


def _attend_torch(qf: torch.Tensor, pieces, qpos: torch.Tensor, window: int | None, sees_until: torch.Tensor | None,
                  scale: float, scores_of) -> torch.Tensor:
    """attend's running softmax over the pieces, in torch."""
    b, h, t, d = qf.shape
    m = l = acc = None
    for k, v, kpos in pieces:
        kv = v.shape[1]
        g = h // kv
        vf = v.float()
        s = scores_of(vf, kpos) if k is None else torch.matmul(qf.reshape(b, kv, g * t, d), k.float().transpose(-1, -2))
        if scale != 1.0:
            s.mul_(scale)
        allowed = attention_mask(qpos, kpos, window, sees_until)  # [B, T, S]
        hidden = None if bool(allowed.all()) else ~allowed[:, None, None]  # (a causal prefill: all but its last piece)
        if hidden is not None:
            s.view(b, kv, g, t, -1).masked_fill_(hidden, float("-inf"))
        top = s.amax(dim=-1, keepdim=True)
        if m is not None:
            top = torch.maximum(top, m)
        top_safe = top.masked_fill(top == float("-inf"), 0.0)  # a query that sees nothing yet
        # torch's exp takes a slow path for arguments below about -87 (whose results are below float32's
        # smallest normal; at attention scale 1 most of a long context's scores are): ~10x the time.
        # Clamped there, a score's weight is e^-87 at most, nothing beside the maximum's 1; hidden keys
        # then get exactly 0 again.
        p = s.sub_(top_safe).clamp_(min=EXP_FLOOR).exp_()
        if hidden is not None:
            p.view(b, kv, g, t, -1).masked_fill_(hidden, 0.0)
        part = torch.matmul(p, vf)
        if m is None:
            l, acc = p.sum(dim=-1, keepdim=True), part
        else:
            corr = torch.exp(m - top_safe)
            l = l.mul_(corr).add_(p.sum(dim=-1, keepdim=True))
            acc = acc.mul_(corr).add_(part)
        m = top
    out = acc / l.clamp(min=torch.finfo(torch.float32).tiny)
    return out.view(b, h, t, -1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.head_dim = d = config.head_dim_of(layer)
        self.kv_heads = kv = config.kv_heads_of(layer)
        self.heads = heads
        self.k_eq_v = config.k_eq_v(layer)
        self.window = config.sliding_window if config.is_sliding(layer) else None
        self.scale = config.attention_scale

        # A KV-shared layer has no K/V projections: it attends over its source layer's KV (Decoder.forward).
        self.kv_shared = config.kv_shared(layer)
        self.q_proj = Linear(hidden, heads * d, bias=False)
        self.o_proj = Linear(heads * d, hidden, bias=False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        if self.kv_shared:
            self.k_proj = self.v_proj = self.k_norm = self.v_norm = None
        else:
            self.k_proj = Linear(hidden, kv * d, bias=False)
            self.v_proj = None if self.k_eq_v else Linear(hidden, kv * d, bias=False)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
            self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False) if config.use_v_norm else None
            if self.k_eq_v and self.v_norm is None:
                raise ValueError("attention_k_eq_v needs v_norm")
        self.register_buffer("inv_freq", rope_inv_freq(config.rope_of(layer), d), persistent=False)

    def read_keys_of(self, source: "Attention") -> None:
        """A KV-shared layer rebuilds K=V keys with its source's k_norm weight (held without registering
        the source as a submodule: its weights stay the source's)."""
        self.__dict__["_key_source"] = source

    @property
    def key_norm_weight(self) -> torch.Tensor:
        return (self.k_norm if self.k_norm is not None else self.__dict__["_key_source"].k_norm).weight

    def rotated_pairs(self) -> int:
        """How many rotate-half pairs (i, i + D/2) RoPE turns: those of a non-zero frequency (the first)."""
        return int((self.inv_freq != 0).sum())

    def keys_from_values(self, v: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """K=V layers: the rotated keys [B, KV, S, D] (float32) of stored values v at positions kpos.
        k_norm(raw) == v_norm(raw) * k_norm.weight, then RoPE."""
        k = v.float() * self.key_norm_weight
        r, half = self.rotated_pairs(), k.shape[-1] // 2
        k[..., :r], k[..., half:half + r] = self._rotate(k[..., :r], k[..., half:half + r], kpos, r)
        return k

    def key_rebuild(self, kpos: torch.Tensor):
        """K=V layers, for the native kernel: (k_norm weight, cos and sin [positions, r]) covering kpos."""
        r = self.rotated_pairs()
        cos, sin = _trig_table(self.inv_freq[:r].to(kpos.device), kpos)
        return self.key_norm_weight, cos, sin

    def keys_values(self, cache, layer: int, row: int, n: int):
        """Row `row`'s rotated K and V of this layer (number `layer` of `cache`) for positions below n:
        k, v [KV heads, m, D] float32 and pos [m] (cache.keys_values, with K=V layers' keys rebuilt)."""
        k, v, pos = cache.keys_values(layer, row, n)
        if k is None:
            k = self.keys_from_values(v[None], pos[None])[0]
        return k.float(), v.float(), pos

    def _rotate(self, x1, x2, kpos, r):
        """RoPE of the r rotated pairs (x1, x2) [B, KV, S, r] at positions kpos [B, S] (negative: 0)."""
        cos, sin = _cos_sin(self.inv_freq[:r].to(x1.device), kpos.clamp(min=0))
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, S, r]
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    def value_scores(self, q: torch.Tensor):
        """K=V layers: scores_of(v, kpos) for attend, q [B, H, T, D] float32, without building whole keys.
        q . rope(v * w) = (q * w) . v on the channels RoPE leaves alone, so the k_norm weight folds into
        q there and only the r rotated pairs of each value are weighted and turned (a quarter of them
        under proportional RoPE)."""
        b, h, t, d = q.shape
        w, r, half = self.key_norm_weight, self.rotated_pairs(), d // 2
        g = h // self.kv_heads
        q_plain = q * w
        q_plain[..., :r] = 0
        q_plain[..., half:half + r] = 0
        q_plain = q_plain.reshape(b, self.kv_heads, g * t, d)
        q_rot = torch.cat([q[..., :r], q[..., half:half + r]], dim=-1).reshape(b, self.kv_heads, g * t, 2 * r)
        w1, w2 = w[:r], w[half:half + r]

        def scores(v: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
            s = torch.matmul(q_plain, v.transpose(-1, -2))
            if r:
                k1, k2 = self._rotate(v[..., :r] * w1, v[..., half:half + r] * w2, kpos, r)
                s.add_(torch.matmul(q_rot, torch.cat([k1, k2], dim=-1).transpose(-1, -2)))
            return s

        return scores

    def forward(self, x: torch.Tensor, qpos: torch.Tensor, kv: RowsView,
                sees_until: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, hidden]; qpos: [B, T] absolute positions (-1: padding); sees_until: see attention_mask."""
        b, t, _ = x.shape
        q = self.queries(x, qpos)
        if self.kv_shared:  # kv hands back what the source layer attended over in this call (decoder._Remembered)
            out = self.over_cache(q, None, None, qpos, kv, sees_until)
            return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

        raw_k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        raw_v = raw_k if self.k_eq_v else self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_norm(raw_v) if self.v_norm is not None else raw_v
        k = None if self.k_eq_v else rotate(self.k_norm(raw_k), qpos, self.inv_freq)
        out = self.over_cache(q, k, v, qpos, kv, sees_until)
        return self.o_proj(out.to(x.dtype).transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    def queries(self, x: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        """The rotated queries [B, T, H, D] of x [B, T, hidden]."""
        b, t, _ = x.shape
        return rotate(self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim)), qpos, self.inv_freq)

    def over_cache(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, qpos: torch.Tensor, kv: RowsView,
                   sees_until: torch.Tensor | None = None) -> torch.Tensor:
        """Stores k, v [B, T, KV, D] (k None on K=V layers: the values only) in the cache and attends the
        rotated queries q [B, T, H, D] over it -> [B, H, T, D] float32."""
        b, t = q.shape[:2]
        step = piece_slots(b, self.heads, t, self.kv_heads, self.head_dim)
        pieces = kv.update(None if k is None else k.transpose(1, 2), None if v is None else v.transpose(1, 2), qpos,
                           chunk=step)
        q = q.transpose(1, 2).float()
        scores_of = _built_on_first_call(lambda: self.value_scores(q)) if self.k_eq_v else None
        return attend(q, pieces, qpos, self.window, sees_until, self.scale, scores_of,
                      self.keys_from_values if self.k_eq_v else None, self.key_rebuild if self.k_eq_v else None)


_TRIG: dict = {}  # (device, frequencies) -> (cos, sin) [positions, r] float32, grown by doubling
_TRIG_MIN = 1024


def _trig_table(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of float(p) * freqs for positions p = 0 .. at least max(pos): [positions, r] float32.
    K=V layers rotate every key of the context at each step, and its angles are the same at every step."""
    key = (freqs.device, freqs.cpu().numpy().tobytes())
    need = int(pos.max()) + 1 if pos.numel() else 1
    table = _TRIG.get(key)
    if table is None or table[0].shape[0] < need:
        n = max(need, _TRIG_MIN, 0 if table is None else 2 * table[0].shape[0])
        angle = torch.arange(n, device=freqs.device).float()[:, None] * freqs
        table = _TRIG[key] = (angle.cos(), angle.sin())
    return table


def _cos_sin(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of float(pos) * freqs, [*pos.shape, r] (pos >= 0), looked up in _trig_table."""
    cos, sin = _trig_table(freqs, pos)
    return cos[pos], sin[pos]


def _built_on_first_call(make):
    """A function that builds the real one with make() when first called (decode steps that attend with
    rebuilt keys never score by values, so they never pay for preparing to)."""
    built = None

    def call(*args):
        nonlocal built
        if built is None:
            built = make()
        return built(*args)

    return call
