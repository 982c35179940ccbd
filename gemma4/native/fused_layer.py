"""A decoder layer's dense parts in three native calls (csrc/fused_layer.cpp), swapped in at load.

attn_in (input norm, q/k/v, their norms, RoPE), attn_out (o and the residual norm) and mlp_block (the gated
MLP between its norms) are the compositions of the ops the layer's modules call one by one, in the same
order on the same values, so the fused layer gives the module path's bits; products sharing an input
(q/k/v, gate/up) quantise it once and run in one parallel region. Decode and verify steps gain most: Python's
per-op cost was ~1/4 of a small model's step.

install(layer) makes a decoder layer whose matrices the kernels take run this way: its class becomes a
subclass that overrides forward (the names of its modules and tensors stay as they are). The layer falls
back on its own forward wherever the fused calls do not apply: off the CPU, float activations, a matrix
replaced by one the kernels do not take, or a prefill whose products BLAS runs faster.
"""

from __future__ import annotations

import torch

from . import compiled, ops


class FusedLayer:
    """Mixed in before a decoder layer's class by install(); reads the layer's modules (self_attn, mlp, the
    norms, the MoE block) as the layer's own forward does."""

    # What the native path needs, gathered on first use (a decode step would otherwise pay ~25 module
    # attribute lookups per layer); None: not planned yet (set it so after replacing a matrix), False: the
    # layer has a matrix the kernel does not take.
    _native_plan = None

    def forward(self, h: torch.Tensor, qpos: torch.Tensor, kv, sees_until: torch.Tensor | None = None,
                per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        plan = self._native(h)
        if plan is None:
            return super().forward(h, qpos, kv, sees_until, per_layer_input)
        kernel, attn_in, rope, attn_out, mlp = plan
        if attn_in is None:  # a KV-shared layer (no K/V of its own): its queries on the module path
            q, k, v = self.self_attn.queries(self.input_layernorm(h), qpos), None, None
        else:
            q, k, v = kernel.attn_in(h, *attn_in, qpos, *rope)
        a = self.self_attn.over_cache(q, k, v, qpos, kv, sees_until)
        h = kernel.attn_out(a, *attn_out, h)
        if self.moe:
            h = self.post_feedforward_layernorm(self._experts(h, kernel.mlp_block(h, *mlp, None)), residual=h)
        else:
            h = kernel.mlp_block(h, *mlp, h)
        return self.finish(h, per_layer_input)  # the per-layer input (E2B/E4B) and the layer scalar

    def _native(self, h: torch.Tensor):
        """This layer's native plan (see _plan_native) where it applies to h: on the CPU in float32 with
        int8 activations; else None."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or ops.activations() != "int8":
            return None
        if self._native_plan is None:
            self._native_plan = self._plan_native()
        rows = h.numel() // h.shape[-1]
        # prefill (BLAS's rows, or the matrix engine's from MATRIX_ENGINE_MIN_ROWS): the modules pick per matrix
        if self._native_plan and (rows >= ops.MIN_BLAS_ROWS or ops.on_engine(rows)) and any(
                ops.blas_first(x.qweight, rows) for x in _dense_linears(self)):
            return None
        return self._native_plan or None

    def _apply(self, fn, *args, **kwargs):  # .to(), .float() and the like replace the tensors planned with
        self._native_plan = None
        return super()._apply(fn, *args, **kwargs)

    def _plan_native(self):
        """(kernel, attn_in's weights, attn_out's, mlp_block's) when every matrix is quantised in a layout
        the kernel takes and the norms share one eps; else False."""
        kernel = compiled()
        a, m = self.self_attn, self.mlp
        norms = [self.input_layernorm, self.post_attention_layernorm, self.pre_feedforward_layernorm,
                 self.post_feedforward_layernorm, a.q_norm, *[n for n in (a.k_norm, a.v_norm) if n is not None]]
        if kernel is None or not _takes(self) or len({n.eps for n in norms}) != 1:
            return False
        eps = self.input_layernorm.eps
        # attn_in computes K and V too: a KV-shared layer, which has none, computes its queries apart
        attn_in = None if a.kv_shared else (
            self.input_layernorm.weight, eps, _packed(a.q_proj), _packed(a.k_proj),
            None if a.v_proj is None else _packed(a.v_proj), a.q_norm.weight, a.k_norm.weight, a.v_norm is not None)
        rope = (a.inv_freq, a.heads, a.kv_heads, a.head_dim)
        attn_out = (_packed(a.o_proj), self.post_attention_layernorm.weight, eps)
        post = self.post_feedforward_layernorm_1 if self.moe else self.post_feedforward_layernorm
        mlp = (self.pre_feedforward_layernorm.weight, eps, _packed(m.gate_proj), _packed(m.up_proj),
               _packed(m.down_proj), post.weight)
        return kernel, attn_in, rope, attn_out, mlp


def install(layer) -> bool:
    """Swaps the fused forward into a decoder layer whose dense matrices the kernels take, where the kernels
    are built; whether it did (or had)."""
    if isinstance(layer, FusedLayer):
        return True
    if not _takes(layer) or compiled() is None:
        return False
    layer.__class__ = _fused_class(type(layer))
    return True


_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedLayer, cls), {"__module__": __name__})
    return _CLASSES[cls]


def _dense_linears(layer) -> list:
    a, m = layer.self_attn, layer.mlp
    return [x for x in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj) if x is not None]


def _takes(layer) -> bool:
    """Whether every dense matrix of the layer is quantised (a module with a qweight) in a layout the
    int8-activation kernels take."""
    return all(getattr(x, "qweight", None) is not None and x.qweight.int8_layout for x in _dense_linears(layer))


def _packed(linear) -> tuple:
    """A quantised linear module's matrix as the native fused ops take it."""
    w = linear.qweight
    return w.q, w.scale, w.zero, w.bits, w.group, w.sub
