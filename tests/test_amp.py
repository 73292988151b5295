"""Mixed precision: SPA blocks and SPT under ``torch.autocast`` (CPU bf16 / fp16) against fp32.

Tolerance: the relative error of the norm, ``||amp - fp32|| / ||fp32||``, of outputs and of input / parameter
gradients is below ``5e-2`` for bf16 (8-bit mantissa: ~4e-3 per rounding, a few roundings deep through
LayerNorm, linear layers, attention and the MLP) and below ``1e-2`` for fp16 (11-bit mantissa). Both runs use
the same weights and the same keep decision (forced, or the eval threshold far from every probability), so
the numbers differ by rounding alone. In SPT (a deep bf16 residual stream on CPU) the bound holds for the
output, the image gradient and all parameters' gradients together; a single parameter's gradient gets 3x it,
as does the gate's bias gradient in a standalone block (a scalar: a signed sum over every kept token).

bf16 on this CPU is slow: every case is a few tokens of a few channels.
"""

from __future__ import annotations

import math

import pytest
import torch

import spa
from spa import attention
from spa.gate import TokenGate, threshold_keep
from spa.models.spa_block import SPABlock
from spa.packing import LAYOUTS, pack

BACKENDS = ("math", "sdpa", "reference")
TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in fp32 (0 when both are zero)."""
    got, want = got.detach().float(), want.detach().float()
    norm = want.norm().item()
    diff = (got - want).norm().item()
    return diff if norm == 0 else diff / norm


def _block(layout: str, backend: str, **kwargs) -> SPABlock:
    # a 4 x 4 map, windows of 2 x 2 shifted by 1: four regions, chunks of 4 tokens, partial chunks and padding
    block = SPABlock(16, (4, 4), 2, window_size=2, shift_size=1, layout=layout, backend=backend, **kwargs)
    return block.eval()


def _run_block(block: SPABlock, x: torch.Tensor, keep: torch.Tensor, amp: torch.dtype | None):
    """(output, selection, x.grad, {name: grad}) of a fixed loss; ``amp``: autocast dtype or None (fp32)."""
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out, selection = block(x, keep=keep)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weight).sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    return out, selection, x.grad, grads


def _assert_close_to_fp32(got, want, tol: float) -> None:
    out, selection, x_grad, grads = got
    out32, selection32, x_grad32, grads32 = want
    assert torch.equal(selection.keep, selection32.keep)
    assert rel_err(out, out32) < tol
    assert rel_err(x_grad, x_grad32) < tol
    assert grads.keys() == grads32.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # fp32 parameters get fp32 gradients
        assert torch.isfinite(grad).all(), name
        # the gate's bias gradient is one number, a signed sum over every kept token: its cancellation
        # amplifies the relative rounding error (0.066-0.074 seen with torch 2.6's bf16 kernels), so 3x
        bound = 3 * tol if name.endswith("gate.proj.bias") else tol
        assert rel_err(grad, grads32[name]) < bound, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_block_under_bf16_autocast_matches_fp32(layout: str, backend: str, in_dtype: torch.dtype) -> None:
    """Forward + backward of a standalone block under bf16 autocast, fp32 or bf16 input, every layout and
    backend: the residual stream keeps the input's dtype (as timm's ``SwinTransformerBlock``), the gate's
    logits are fp32, and outputs and gradients match an fp32 run within the tolerance."""
    block = _block(layout, backend, min_keep=1)
    x = torch.randn(2, 4, 4, 16).to(in_dtype)
    keep = torch.rand(2, 4, 4) < 0.6
    keep[1] = True  # one image keeps all (full containers), the other a partial selection (padding)
    got = _run_block(block, x, keep, torch.bfloat16)
    want = _run_block(block, x.float(), keep, None)
    out, selection, x_grad, _ = got
    assert out.dtype == in_dtype and x_grad.dtype == in_dtype
    assert selection.own_logits.dtype == selection.fused_logits.dtype == torch.float32
    _assert_close_to_fp32(got, want, TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("ffn", ["kept", "all"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_block_gate_decision_and_ffn_all_under_autocast(ffn: str, amp: torch.dtype) -> None:
    """The gate's own decision (eval threshold, no override) under bf16 and fp16 autocast, with the FFN on
    unselected tokens too: the same fp32 logits and keep mask as in fp32, outputs and gradients close."""
    block = _block("containers", "math", ffn=ffn, keep_threshold=0.5)
    block.gate.proj.bias.data.zero_()
    block.gate.proj.weight.data.normal_(0, 1.0)  # logits of order 1: some tokens kept, some not
    x = torch.randn(2, 4, 4, 16)  # fp32: the gate's logits are bit-identical, so is its decision
    got = _run_block(block, x, None, amp)
    want = _run_block(block, x, None, None)
    assert 0 < int(got[1].keep.sum()) < x.shape[0] * 16
    assert got[0].dtype == torch.float32 and got[1].own_logits.dtype == torch.float32
    assert torch.equal(got[1].own_logits, want[1].own_logits)  # fp32 input: the same fp32 logits, bit for bit
    _assert_close_to_fp32(got, want, TOLERANCE[amp])


def _spt(spa_stages: tuple[int, ...], layout: str = "containers", backend: str = "auto") -> spa.SPT:
    # 32 x 32 images, patches of 4: maps 8x8, 4x4, 2x2, 1x1; windows of 2 (shifted in stages 1-2)
    return spa.SPT(
        img_size=32,
        num_classes=5,
        embed_dim=8,
        depths=(2, 2, 2, 1),
        num_heads=(1, 1, 2, 2),
        window_size=2,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        spa_stages=spa_stages,
        layout=layout,
        backend=backend,
    )


def _run_spt(model: spa.SPT, x: torch.Tensor, amp: torch.dtype | None):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out, selections = model.forward_with_selections(x)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out.float() * weight).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, selections, x.grad, grads


@pytest.mark.parametrize(
    "spa_stages, layout",
    [((0, 1, 2, 3), layout) for layout in LAYOUTS] + [((2, 3), "containers"), ((2, 3), "masked")],
)
def test_spt_under_bf16_autocast_matches_fp32(spa_stages: tuple[int, ...], layout: str) -> None:
    """SPT with SPA in every stage (stage 1 gets the patch embedding's output, fp32 on CUDA) and the default
    stages 3-4: forward + backward under bf16 autocast close to fp32, gate logits in fp32."""
    model = _spt(spa_stages, layout).eval()  # eval: the gate's threshold, far from its initial probability
    x = torch.randn(2, 3, 32, 32)
    out, selections, x_grad, grads = _run_spt(model, x, torch.bfloat16)
    out32, selections32, x_grad32, grads32 = _run_spt(model, x, None)
    assert len(selections) == sum(model.depths[s] for s in spa_stages)
    for s, s32 in zip(selections, selections32):
        assert s.own_logits.dtype == s.fused_logits.dtype == torch.float32
        assert torch.equal(s.keep, s32.keep)
    tol = TOLERANCE[torch.bfloat16]
    assert rel_err(out, out32) < tol and rel_err(x_grad, x_grad32) < tol
    assert grads.keys() == grads32.keys()
    flat, flat32 = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, grads32))
    assert rel_err(flat, flat32) < tol  # all parameters' gradients together
    for name, grad in grads.items():  # one by one: tiny gradients deep in the net (norm biases, ~1e-4 of the
        # largest) collect relatively more rounding through the bf16 stream, hence a looser per-parameter bound
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert rel_err(grad, grads32[name]) < 3 * tol, name


@pytest.mark.parametrize("spa_stages", [(0, 1, 2, 3), (2, 3)])
def test_spt_trains_under_autocast(spa_stages: tuple[int, ...]) -> None:
    """Training mode (Gumbel noise, stochastic depth, fp32 and bf16 images): forward + backward run, every
    gate's logits are fp32, gradients are finite and reach the gates."""
    model = spa.SPT(
        img_size=32, num_classes=5, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=2,
        mlp_ratio=2.0, drop_path_rate=0.2, spa_stages=spa_stages, straight_through=True,
    ).train()  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, selections = model.forward_with_selections(torch.randn(2, 3, 32, 32, dtype=dtype))
        assert all(s.own_logits.dtype == torch.float32 for s in selections)
        (out.float().square().mean() + sum(s.own_logits.mean() for s in selections)).backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        assert all(b.gate.proj.weight.grad.abs().sum() > 0 for b in model.spa_blocks())


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_gate_scores_and_decides_in_fp32_under_autocast(in_dtype: torch.dtype) -> None:
    gate = TokenGate(16, keep_threshold=0.5).eval()
    gate.proj.weight.data.normal_(0, 1.0)
    x = torch.randn(2, 5, 16).to(in_dtype)
    expected = torch.nn.functional.linear(x.float(), gate.proj.weight, gate.proj.bias).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decision = gate(x)
    assert decision.own_logits.dtype == decision.fused_logits.dtype == decision.soft.dtype == torch.float32
    torch.testing.assert_close(decision.own_logits, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(decision.keep, threshold_keep(expected, 0.5))
    # a model cast to bf16 (no autocast) still scores in fp32, from fp32 copies of the weights
    gate_bf16 = TokenGate(16).to(torch.bfloat16)
    logits = gate_bf16.score(x.bfloat16())
    want = torch.nn.functional.linear(
        x.bfloat16().float(), gate_bf16.proj.weight.float(), gate_bf16.proj.bias.float()
    )
    assert logits.dtype == torch.float32 and torch.equal(logits, want.squeeze(-1))


def test_rows_math_path_is_taken_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast the math backend keeps the rows-to-rows ``_RowsMathAttention`` (no q/k/v fallback): it
    runs once per block in bf16, its backward gives gradients of the dtypes the inputs had, and it agrees with
    the q/k/v path (what HEAD ran under autocast) under the same autocast."""
    calls = []
    original = attention._RowsMathAttention.apply

    def counting(*args):
        calls.append(args[0].dtype)
        return original(*args)

    monkeypatch.setattr(attention._RowsMathAttention, "apply", counting)
    block = _block("containers", "math")
    x = torch.randn(2, 4, 4, 16)
    keep = torch.rand(2, 4, 4) < 0.6
    rows = _run_block(block, x, keep, torch.bfloat16)
    assert calls == [torch.bfloat16]
    names, stack, seen = set(), [rows[0].grad_fn], set()
    while stack:  # the autograd graph of the output holds the function's backward node
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert "_RowsMathAttentionBackward" in names
    monkeypatch.setattr(block.attn, "_rows_math_applies", lambda *_: False)  # the q/k/v math path
    qkv_path = _run_block(block, x, keep, torch.bfloat16)
    assert len(calls) == 1
    tol = TOLERANCE[torch.bfloat16]
    assert rel_err(rows[0], qkv_path[0]) < tol and rel_err(rows[2], qkv_path[2]) < tol
    for name, grad in rows[3].items():
        assert grad.dtype == torch.float32 and rel_err(grad, qkv_path[3][name]) < tol, name


def test_residual_writes_keep_the_base_dtype() -> None:
    """``add_rows`` / ``scatter_rows`` of low-precision rows (an autocast update) into an fp32 map: the map's
    dtype, as ``base + update`` promotes; unkept tokens bit-identical."""
    x = torch.randn(2, 6, 4)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for layout in LAYOUTS:
        packed = pack(x, keep, 3, layout)
        rows = torch.randn(packed.num_rows, 4).bfloat16()
        added, written = packed.add_rows(x, rows), packed.scatter_rows(rows, fill=x)
        assert added.dtype == written.dtype == torch.float32
        rows32 = rows.float()
        torch.testing.assert_close(added, packed.add_rows(x, rows32), rtol=0, atol=0)
        torch.testing.assert_close(written, packed.scatter_rows(rows32, fill=x), rtol=0, atol=0)
        assert torch.equal(added[~keep], x[~keep]) and torch.equal(written[~keep], x[~keep])


def test_trainer_amp_modes(tmp_path):
    """``spa train --amp``: bf16 / fp16 (loss scaling) steps run on CPU; off equals the plain fp32 step;
    old boolean configs still read."""
    from spa.data import builtin_dataset, collate_detection, detection_transforms, make_builtin
    from spa.engine import TrainConfig, Trainer
    from spa.tasks import build_detector

    root = make_builtin(tmp_path / "d", images=2, val_images=1, size=64, seed=1)
    data = builtin_dataset(root, "train", transforms=detection_transforms(False, 64))
    losses = {}
    for amp in ("off", "bf16", "fp16"):
        torch.manual_seed(0)
        model = build_detector(model="spt_nano", num_classes=data.num_classes, img_size=64, min_size=64,
                               max_size=64, fpn_channels=16, representation_size=32)  # fmt: skip
        config = TrainConfig(out_dir=str(tmp_path / amp), max_steps=1, batch_size=2, amp=amp, progress=False)
        trainer = Trainer(model, data, collate_detection, config, {"task": "test"})
        assert trainer.scaler.is_enabled() == (amp == "fp16")
        losses[amp] = trainer.train()["last"]["loss"]
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["bf16"] - losses["off"]) < 0.1 * abs(losses["off"])
    assert TrainConfig(amp=True).amp == "auto" and TrainConfig(amp=False).amp == "off"
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
