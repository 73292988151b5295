"""spa.layers.RowsLinear: nn.Linear's parameters and results, in the GEMM orientation that is fast for few rows."""

import pytest
import torch
from torch import nn

import spa.layers as layers
from spa.layers import RowsLinear, few_rows_applies
from spa.models.spa_block import SPABlock


@pytest.fixture
def small_weights(monkeypatch):
    """Let the few-rows path apply to the small layers of the tests."""
    monkeypatch.setattr(layers, "FEW_ROWS_MIN_WEIGHT", 0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, layers.FEW_ROWS - 1, layers.FEW_ROWS, 50])
def test_rows_linear_equals_linear(small_weights, bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    rows_linear = RowsLinear.from_linear(linear)
    x = torch.randn(rows, 24)
    with torch.no_grad():
        out = rows_linear(x)
        torch.testing.assert_close(out, linear(x))
        assert few_rows_applies(x, linear.weight) is (rows < layers.FEW_ROWS)
    # the transposed product (a transposed view) exactly below the threshold
    assert out.is_contiguous() is (rows >= layers.FEW_ROWS or rows == 1)


def test_from_linear_shares_the_parameters_and_state_dict():
    linear = nn.Linear(8, 16)
    rows_linear = RowsLinear.from_linear(linear)
    assert rows_linear.weight is linear.weight and rows_linear.bias is linear.bias
    assert isinstance(rows_linear, nn.Linear)
    assert rows_linear.state_dict().keys() == linear.state_dict().keys()
    no_bias = RowsLinear.from_linear(nn.Linear(8, 16, bias=False))
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]


def test_few_rows_path_only_where_it_applies(small_weights):
    linear = RowsLinear(16, 32)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert few_rows_applies(x, linear.weight)
        assert not few_rows_applies(x.double(), linear.weight.double())  # float32 only
        assert not few_rows_applies(x[None], linear.weight)  # 2-D rows only
        with torch.autocast("cpu", dtype=torch.bfloat16):  # not measured under autocast: F.linear
            assert not few_rows_applies(x, linear.weight)
    # autograd records the product: F.linear, and its gradients
    assert not few_rows_applies(x, linear.weight)
    x.requires_grad_(True)
    linear(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(4, 16))


def test_small_weights_and_switch_off_keep_linear(monkeypatch):
    with torch.no_grad():
        x = torch.randn(4, 16)
        assert not few_rows_applies(x, torch.zeros(32, 16))  # below FEW_ROWS_MIN_WEIGHT: stays in cache
        big = torch.zeros(1024, 1024)
        assert few_rows_applies(torch.zeros(4, 1024), big)
        monkeypatch.setattr(layers, "FEW_ROWS", 0)
        assert not few_rows_applies(torch.zeros(4, 1024), big)


def test_spa_block_linear_layers_are_rows_linear_with_timm_names():
    block = SPABlock(dim=32, input_resolution=(7, 7), num_heads=2)
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
        assert type(layer) is RowsLinear
    names = set(block.state_dict())
    assert {"attn.qkv.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc2.bias"} <= names


@pytest.mark.parametrize("ffn", ["kept", "all"])
def test_spa_block_same_output_with_and_without_few_rows_path(monkeypatch, small_weights, ffn):
    torch.manual_seed(0)
    block = SPABlock(dim=32, input_resolution=(7, 7), num_heads=2, select="topk", keep_ratio=0.3, ffn=ffn)
    block.eval()
    x = torch.randn(1, 7, 7, 32)
    taken = []
    applies = layers.few_rows_applies
    monkeypatch.setattr(layers, "few_rows_applies", lambda x, w: taken.append(applies(x, w)) or taken[-1])
    with torch.no_grad():
        fast, _ = block(x)  # 15 kept rows (and 34 unkept for ffn='all'): the few-rows path below FEW_ROWS
        # qkv, proj, fc1, fc2 on the kept rows took it; ffn='all' adds fc1, fc2 on the 34 unkept rows
        assert taken == [True] * 4 + ([False] * 2 if ffn == "all" else [])
        monkeypatch.setattr(layers, "FEW_ROWS", 0)
        plain, _ = block(x)
    torch.testing.assert_close(fast, plain)
