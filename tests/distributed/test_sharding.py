"""The sharding rules: ranges, KV heads shared by ranks, and cuts of quantised matrices that give the columns
of the whole matrix exactly (a cut must not move a block's scale to the wrong columns)."""

import pytest
import torch

from gemma4.config.text import ModelConfig
from gemma4.distributed.sharding import Plan, split
from gemma4.quant import formats
from reference import gemma4_text_config


def test_split_is_contiguous_even_and_in_whole_units():
    assert split(2112, 4, 32) == [(0, 544), (544, 1088), (1088, 1600), (1600, 2112)]
    with pytest.raises(ValueError, match="whole 256-wide units"):
        split(2112, 2, 256)


def test_kv_heads_split_with_their_query_heads_or_are_shared():
    config = ModelConfig.from_hf(gemma4_text_config("moe_kv").to_dict())  # 4 heads; 2 KV, 1 on global layers
    for world in (2, 4):
        for rank in range(world):
            plan = Plan.of(rank, world, 1)
            q0, _ = plan.heads(config)
            group = config.num_attention_heads // config.kv_heads_of(0)
            assert plan.kv_heads(config, 0)[0] == q0 // group  # the KV head its query heads read
            assert plan.kv_heads(config, 2) == (0, 1)  # the one global KV head, on every rank
    with pytest.raises(ValueError, match="does not divide the 4 attention heads"):
        Plan.of(0, 3, 1).heads(config)


@pytest.mark.parametrize("quantize", [formats.quantize_int4, formats.quantize_int8])
def test_a_column_cut_of_a_quantised_matrix_is_those_columns(quantize):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    q = quantize(w)
    whole = q.dequantize()
    plan = Plan.of(1, 2, 1)
    config = ModelConfig.from_hf(gemma4_text_config("moe_kv", intermediate_size=256).to_dict())
    part = plan.cut(config, "layers.0.mlp.down_proj.weight", q)
    assert torch.equal(part.dequantize(), whole[:, 128:])
    assert torch.equal(plan.cut(config, "layers.0.mlp.up_proj.weight", q).dequantize(), whole[128:])
