"""The decoder's small building blocks against torch's own formulas."""

import torch
from torch.nn import functional as F

from gemma4.model.layers import gelu_tanh_mul


def test_gelu_tanh_mul_same_bits_as_torch_in_place():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(64, 300, generator=g) * 4, torch.randn(64, 300, generator=g)
    expected = F.gelu(gate, approximate="tanh") * up
    with torch.inference_mode():
        held = gate.clone()
        out = gelu_tanh_mul(held, up)
    assert torch.equal(out, expected)  # the same kernels, only the output's memory differs
    assert out.data_ptr() == held.data_ptr()  # written over the gate: no fresh tensor


def test_gelu_tanh_mul_leaves_inputs_that_autograd_needs():
    gate = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16)
    before = gate.detach().clone()
    out = gelu_tanh_mul(gate, up)
    out.sum().backward()  # an in-place gelu would break the graph
    assert torch.equal(gate.detach(), before)
    assert torch.equal(out.detach(), F.gelu(before, approximate="tanh") * up)


def test_gelu_tanh_mul_broadcasts_and_promotes_as_the_product_does():
    gate = torch.randn(4, 1, 8, dtype=torch.bfloat16)
    up = torch.randn(4, 3, 8)
    with torch.inference_mode():
        out = gelu_tanh_mul(gate, up)
        expected = F.gelu(gate, approximate="tanh") * up
    assert out.shape == (4, 3, 8) and out.dtype == torch.float32 and torch.equal(out, expected)
