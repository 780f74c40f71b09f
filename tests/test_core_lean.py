"""The engine's lean paths against plain computations: float64 inner products without float64 copies, masks made
one tensor at a time, trim draws made piece by piece, and the applied-step guarantee on float32 weights checked
without a copy of them."""

import math

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator

import erase.core.inner as inner
import erase.core.trim as trim
from classify.adapter import ClassifierAdapter
from erase.core import EngineConfig, run
from erase.core.methods.scissorhands import Scissorhands, ScissorhandsConfig
from erase.core.inner import add_and_measure_, gram_matrix, inner_products
from erase.core.projection import add_memories_, project_
from erase.core.topk import iter_topk_masks, topk_masks


def reference_dot(a, b) -> float:
    """Σ ⟨a_t, b_t⟩ from float64 copies (exact products), summed with math.fsum (correctly rounded)."""
    return math.fsum(v for x, y in zip(a, b) for v in (x.double() * y.double()).reshape(-1).tolist())


@pytest.mark.parametrize("stage", [7, 64, 1 << 17])
def test_inner_products_equal_float64_sums(stage, monkeypatch):
    """Pieces of any size, tensors spanning several staging buffers, ``None`` entries as zeros, float32 and bf16:
    the same sums as float64 copies, to float64 rounding; absolute pairs are Σ|a||b|."""
    monkeypatch.setattr(inner, "STAGE_CPU", stage)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (17,), (2, 3, 4), (1,), (40, 9)]
    a = [torch.randn(s, generator=gen) * 1e3 for s in shapes]
    b = [torch.randn(s, generator=gen).bfloat16() for s in shapes]
    c = [torch.randn(s, generator=gen) for s in shapes]
    c[1] = None
    b32 = [t.float() for t in b]
    c0 = [t if t is not None else torch.zeros(s) for t, s in zip(c, shapes)]
    got = inner_products([a, b32, c], [(0, 1), (1, 2), (0, 0)], abs_pairs=[(0, 2)])
    want = [reference_dot(a, b32), reference_dot(b32, c0), reference_dot(a, a), reference_dot([x.abs() for x in a], [y.abs() for y in c0])]
    for g, w in zip(got.tolist(), want):
        assert g == pytest.approx(w, rel=1e-14, abs=1e-9)
    gram = gram_matrix([a, c])
    assert gram.dtype == torch.float64 and gram[0, 1] == gram[1, 0]
    assert float(gram[0, 1]) == pytest.approx(reference_dot(a, c0), rel=1e-14)


@pytest.mark.parametrize("wide,channels_last", [(False, False), (True, False), (False, True)])
def test_add_and_measure_equals_separate_passes(wide, channels_last, monkeypatch):
    """The fused correction pass: the same update as a whole-tensor add, Σ|x||g| of the tensors before it and
    ⟨x_after, g⟩ (or ⟨origin − x_after, g⟩) after it, as separate float64 computations give them."""
    monkeypatch.setattr(inner, "STAGE_CPU", 16)
    dtype = torch.float64 if wide else torch.float32
    gen = torch.Generator().manual_seed(4)
    shapes = [(3, 7), (5,), (40,), (2, 3, 2, 2)]
    x = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if channels_last:  # a conv weight in channels-last layout has no flat view
        x[3] = x[3].to(memory_format=torch.channels_last)
        assert not x[3].is_contiguous()
    mems = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(2)]
    origin = [t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=dtype) for t in x] if wide else None
    want = [t.clone() for t in x]
    add_memories_(want, mems, [0.25, -2.0])
    absolute, after = add_and_measure_(x, mems, [0.25, -2.0], origin=origin)
    if not wide:  # float32: the pieces add exactly what the whole-tensor add does
        assert all(torch.equal(a, b) for a, b in zip(x, want))
    measured = [b - a for a, b in zip(x, origin)] if wide else x
    for j, mem in enumerate(mems):
        assert float(after[j]) == pytest.approx(reference_dot(measured, mem), rel=1e-12, abs=1e-12)
        before = [t - 0.25 * m0 + 2.0 * m1 for t, m0, m1 in zip(x, mems[0], mems[1])]
        assert float(absolute[j]) == pytest.approx(reference_dot([t.abs() for t in before], [m.abs() for m in mem]), rel=1e-6)


def test_projection_given_dots_equals_computed():
    gen = torch.Generator().manual_seed(1)
    mems = [[torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)] for _ in range(2)]
    g = [torch.randn(t.shape, generator=gen) - 1.5 * (t + u) for t, u in zip(*mems)]  # violates both memories
    full = gram_matrix([g, *mems])
    a, b = [t.clone() for t in g], [t.clone() for t in g]
    info_a = project_(a, mems)
    info_b = project_(b, mems, dots=full[0, 1:], gram=full[1:, 1:])
    assert info_a["projected"] and min(info_a["dots"]) < 0 and info_a == info_b and all(torch.equal(x, y) for x, y in zip(a, b))


def test_masks_one_at_a_time_release_the_scores():
    gen = torch.Generator().manual_seed(2)
    scores = {"a": torch.rand(30, generator=gen), "b": torch.rand(4, 5, generator=gen), "c": torch.rand(8, generator=gen)}
    want = topk_masks(scores, 25.0)
    held = dict(scores)
    masks = iter_topk_masks(held, 25.0, release=True)
    got = {}
    for name, mask in masks:
        assert name not in held  # released before its mask is handed out
        got[name] = mask
    assert held == {} and list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(ValueError, match="non-negative"):  # errors come before any mask
        iter_topk_masks({"a": torch.tensor([1.0, -1.0])}, 50)


@pytest.mark.parametrize("init", ["default", "uniform", "normal"])
def test_trim_draws_piece_by_piece_as_if_drawn_whole(init, monkeypatch):
    """The selected entries get the values a whole-tensor draw would have put there (same generator, row-major),
    for tensors shorter, equal to and longer than a piece, so no full-size draw is needed."""
    monkeypatch.setattr(trim, "PIECE", 32)
    gen = torch.Generator().manual_seed(3)
    lin = nn.Sequential(nn.Linear(9, 13), nn.Embedding(7, 5), nn.Linear(4, 3))
    params = dict(lin.named_parameters())
    masks = {n: torch.rand(p.shape, generator=gen) < 0.4 for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    kinds, fan_ins = trim.module_kinds(lin), trim.bias_fan_ins(lin)
    trim.trim_(params, masks, init=init, seed=5, kinds=kinds, fan_ins=fan_ins)
    ref = torch.Generator().manual_seed(5)
    for n, p in params.items():  # the reference: one draw of the whole tensor per tensor, in order
        kind, scale = trim._rule(n, p, init, kinds.get(n), fan_ins.get(n))
        whole = torch.empty(p.shape)
        if kind == "const":
            whole.fill_(scale)
        elif kind == "normal":
            whole.normal_(0.0, scale, generator=ref)
        else:
            whole.uniform_(-scale, scale, generator=ref)
        assert torch.equal(p.detach()[masks[n]], whole[masks[n]]), n
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]]), n


class Watched(Scissorhands):
    """Scissorhands whose applied steps are measured independently: ⟨g_o, θ_old − θ_stored⟩ from a copy, exactly."""

    def __init__(self, config):
        super().__init__(config)
        self.snap, self.margins = None, []

    def after_backward(self, ctx, model, step):
        out = super().after_backward(ctx, model, step)
        self.snap = [p.detach().clone() for p in ctx.params.values()] if "projected" in out else None
        return out

    def after_step(self, ctx, model, step):
        new = [p.detach().clone() for p in ctx.params.values()]
        out = super().after_step(ctx, model, step)
        if self.snap is not None:
            for mem in self.memories:
                rise = reference_dot(mem, [b - p.detach() for b, p in zip(self.snap, ctx.params.values())])
                tol = torch.finfo(torch.float32).eps * reference_dot([m.abs() for m in mem], [t.abs() for t in new])
                self.margins.append(rise / tol)  # ≥ -1: no more than rounding the stored weights explains
        return out


def test_applied_step_guarantee_on_float32_weights_without_a_copy(trained_mlp, digits_tensors, tmp_path):
    """float32 weights take the copy-free path (⟨g_o, θ_old⟩ − ⟨g_o, θ_new⟩ with exact float64 products): Adam's steps
    that lower the memory forget loss are found and corrected, and no stored step lowers it beyond rounding."""
    x, y = digits_tensors
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    model.load_state_dict(trained_mlp)
    forget = torch.arange(len(y)) % 10 == 0
    adapter = ClassifierAdapter(model, (x[forget], y[forget]), (x[~forget], y[~forget]), num_classes=10, batch_size=32)
    method = Watched(ScissorhandsConfig(lam=0.0, ablation="no_trim"))
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=30, lr=2e-3, optimizer="adam", progress=False),
              accelerator=Accelerator(cpu=True))
    counts = res.method_summary
    assert counts["update_checked"] == 30 and counts["update_violated"] >= 3 and counts["update_corrected"] >= counts["update_violated"]
    assert counts["update_violated_after"] == 0
    assert len(method.margins) == 30 and min(method.margins) >= -1.0
    assert all(p.dtype == torch.float32 for p in res.params.values()) and method._pending is None
