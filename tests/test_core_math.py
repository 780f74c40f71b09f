"""Projection, selection, trim, saliency, targets and streams, against explicit computations."""

import itertools

import pytest
import torch
import torch.nn as nn

from erase.core.projection import project_, solve_dual
from erase.core.saliency import saliency_scores
from erase.core.stream import EndlessStream, stack_collate
from erase.core.targets import TargetError, describe, select_parameters
from erase.core.topk import TopKError, global_topk_masks, num_selected, per_tensor_topk_masks, topk_masks
from erase.core.trim import bias_fan_ins, module_kinds, summarize, trim_


# -- projection -----------------------------------------------------------------------------------------------
def brute_force_qp(g, G):
    """min ||x - g||² s.t. G x >= 0, by enumerating active sets (KKT)."""
    best = None
    m = G.shape[0]
    for r in range(m + 1):
        for active in itertools.combinations(range(m), r):
            if r == 0:
                x = g.clone()
            else:
                A = G[list(active)]
                lam = torch.linalg.solve(A @ A.T, -(A @ g))
                if (lam < -1e-10).any():
                    continue
                x = g + A.T @ lam
            if ((G @ x) >= -1e-9).all():
                d = float((x - g).norm())
                if best is None or d < best[0]:
                    best = (d, x)
    return best[1]


def brute_force_gem(g, G, margin):
    """GEM's ``project2cone2`` by enumeration: ``min_v ½vᵀGGᵀv + (Gg)ᵀv  s.t.  v ≥ margin``, then ``g + Gᵀv``.

    For every set F of free coordinates (the rest at the bound) solve the stationarity equations on F and keep the
    KKT point: v_F ≥ margin and a non-negative gradient on the bound coordinates.
    """
    P, q = G @ G.T, G @ g
    m = G.shape[0]
    for r in range(m + 1):
        for free in itertools.combinations(range(m), r):
            v = torch.full((m,), float(margin), dtype=torch.float64)
            f = list(free)
            if f:
                b = [i for i in range(m) if i not in free]
                rhs = -(q[f] + (P[f][:, b] @ v[b] if b else 0.0))
                v[f] = torch.linalg.solve(P[f][:, f], rhs)
            grad = P @ v + q
            bound = [i for i in range(m) if i not in free]
            if (v >= margin - 1e-10).all() and (grad[bound] >= -1e-10).all():
                return g + G.T @ v
    raise AssertionError("no KKT point")


def split(v, sizes=(3, 5, 4)):
    return [t.clone() for t in torch.split(v, list(sizes))]


@pytest.mark.parametrize("m", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_brute_force(m, seed):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(12, generator=gen, dtype=torch.float64) - 1.5 * G.sum(0)  # violate at least one memory
    assert (G @ g).min() < 0
    grads = split(g)
    info = project_(grads, [split(G[i]) for i in range(m)])
    out = torch.cat(grads)
    assert info["projected"]
    assert (G @ out).min() >= -1e-9 * float(g.norm() * G.norm())
    assert torch.allclose(out, brute_force_qp(g, G), atol=1e-8)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_margin_matches_gem(m, margin, seed):
    """``margin`` constrains GEM's dual to v ≥ margin (quadprog h = margin), as in the reference project2cone2."""
    gen = torch.Generator().manual_seed(10 + seed)
    G = torch.randn(m, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(12, generator=gen, dtype=torch.float64) - 1.5 * G.sum(0)
    grads = split(g)
    info = project_(grads, [split(G[i]) for i in range(m)], margin=margin)
    assert info["projected"] and min(info["v"]) >= margin - 1e-12
    assert torch.allclose(torch.cat(grads), brute_force_gem(g, G, margin), atol=1e-8)
    if margin == 0.0:
        assert torch.allclose(torch.cat(grads), brute_force_qp(g, G), atol=1e-8)


def test_projection_leaves_feasible_gradient_alone():
    g_o = torch.tensor([1.0, 0.0, 0.0])
    g = torch.tensor([0.5, -2.0, 3.0])
    grads = [g.clone()]
    info = project_(grads, [[g_o]])
    assert not info["projected"] and torch.equal(grads[0], g)


def test_projection_closed_form_and_margin():
    g_o = torch.tensor([2.0, 0.0])
    g = torch.tensor([-1.0, 3.0])
    grads = [g.clone()]
    project_(grads, [[g_o]])
    assert torch.allclose(grads[0], torch.tensor([0.0, 3.0]))  # component along g_o removed exactly
    # GEM's dual: v = max(margin, -<g, g_o>/|g_o|^2) = max(margin, 0.5); not 0.5 + margin
    grads = [g.clone()]
    project_(grads, [[g_o]], margin=0.5)
    assert torch.allclose(grads[0], torch.tensor([0.0, 3.0]))
    grads = [g.clone()]
    project_(grads, [[g_o]], margin=2.0)
    assert torch.allclose(grads[0], torch.tensor([3.0, 3.0]))  # a margin above the exact solution pushes past the boundary
    assert float(grads[0] @ g_o) > 0


def test_dual_solver_against_known_solution():
    gram = torch.tensor([[2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    v = solve_dual(gram, torch.tensor([-2.0, 4.0], dtype=torch.float64))
    assert torch.allclose(v, torch.tensor([1.0, 0.0], dtype=torch.float64))
    v = solve_dual(gram, torch.tensor([-2.0, 4.0], dtype=torch.float64), lower=0.25)
    assert torch.allclose(v, torch.tensor([1.0, 0.25], dtype=torch.float64))


# -- selection ------------------------------------------------------------------------------------------------
def reference_mask(scores, k):
    """A stable descending sort of the concatenation; zero scores are never taken."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices[: num_selected(flat.numel(), k)]
    order = order[flat[order] > 0]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


@pytest.mark.parametrize("k", [1.5, 7.5, 33.3, 50, 99.9, 100])
@pytest.mark.parametrize("ties", [False, True])
def test_global_topk_equals_full_sort(k, ties):
    gen = torch.Generator().manual_seed(int(k * 10) + ties)
    make = (lambda *s: torch.randint(0, 4, s, generator=gen).float()) if ties else (lambda *s: torch.rand(*s, generator=gen))
    scores = {"a": make(6, 5), "b": make(17), "c": make(2, 3, 4), "d": torch.zeros(3)}
    info = {}
    masks = global_topk_masks(scores, k, info)
    got = torch.cat([masks[n].reshape(-1) for n in scores])
    positive = int(sum(int((s > 0).sum()) for s in scores.values()))
    assert int(got.sum()) == min(num_selected(got.numel(), k), positive) == info["selected"]
    assert info["requested_k"] == num_selected(got.numel(), k) and info["zero_score_excluded"] == info["requested_k"] - info["selected"]
    assert torch.equal(got, reference_mask(scores, k))
    assert all(masks[n].shape == scores[n].shape for n in scores)


def test_per_tensor_topk_counts():
    scores = {"a": torch.rand(100), "b": torch.ones(10, 10)}
    masks = per_tensor_topk_masks(scores, 25)
    assert int(masks["a"].sum()) == 25 and int(masks["b"].sum()) == 25
    assert torch.equal(masks["a"], torch.zeros(100, dtype=torch.bool).index_fill_(0, scores["a"].topk(25).indices, True))
    assert masks["b"].reshape(-1)[:25].all() and not masks["b"].reshape(-1)[25:].any()  # ties: lowest index first


@pytest.mark.parametrize("k", [0, -1, 100.5, float("nan")])
def test_topk_out_of_range(k):
    with pytest.raises(ValueError, match=r"outside \(0, 100\]"):
        global_topk_masks({"a": torch.rand(4)}, k)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_topk_never_selects_zero_scores_and_says_so(scope, caplog):
    scores = {"a": torch.tensor([3.0, 0.0, 0.0, 0.0]), "b": torch.tensor([0.0, 2.0, 0.0, 0.0])}
    info = {}
    with caplog.at_level("WARNING", logger="erase.core.topk"):
        masks = topk_masks(scores, 75, scope, info=info)
    assert masks["a"].tolist() == [True, False, False, False] and masks["b"].tolist() == [False, True, False, False]
    assert info == {"ranked": 8, "requested_k": 6, "selected": 2, "zero_score_excluded": 4}
    assert "only 2 have a non-zero score" in caplog.text


def test_topk_that_rounds_to_zero_raises():
    with pytest.raises(TopKError, match=r"top-k 1% of 10 targeted entries selects 0; raise --topk"):
        global_topk_masks({"a": torch.rand(10)}, 1)
    with pytest.raises(TopKError, match="raise --mask_ratio"):
        topk_masks({"a": torch.rand(4), "b": torch.rand(6)}, 5, "per_tensor", flag="--mask_ratio")
    assert int(per_tensor_topk_masks({"a": torch.rand(4), "b": torch.rand(60)}, 5)["b"].sum()) == 3  # a's 0 is fine


def test_topk_rejects_negative_scores():
    with pytest.raises(ValueError, match="non-negative"):
        global_topk_masks({"a": torch.tensor([1.0, -1.0])}, 50)


# -- trim -----------------------------------------------------------------------------------------------------
def test_trim_changes_exactly_the_selected_entries():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    params = dict(lin.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    masks = {"weight": torch.rand(20, 30) < 0.3, "bias": torch.rand(20) < 0.5}
    stats = trim_(params, masks, init="default", seed=3)
    for n, p in params.items():
        changed = p.detach() != before[n]
        assert torch.equal(p.detach()[~masks[n]], before[n][~masks[n]])
        if n == "weight":
            assert torch.equal(changed, masks[n])  # continuous draws: every selected entry differs
            assert p.detach()[masks[n]].abs().max() <= 1 / 30 ** 0.5  # kaiming-uniform(a=√5) bound 1/√fan_in
        else:
            assert (p.detach()[masks[n]] == 0).all()  # biases are zeroed
        assert stats[n]["reset"] == int(masks[n].sum())
    assert summarize(stats)["reset"] == int(masks["weight"].sum() + masks["bias"].sum())


def test_trim_is_seeded_and_inits_differ():
    outs = {}
    for init in ("default", "uniform", "normal", "zero"):
        lin = nn.Linear(8, 8)
        torch.nn.init.constant_(lin.weight, 5.0)
        trim_({"weight": lin.weight}, {"weight": torch.ones(8, 8, dtype=torch.bool)}, init=init, seed=1)
        outs[init] = lin.weight.detach().clone()
    assert (outs["zero"] == 0).all()
    assert outs["default"].abs().max() <= 8 ** -0.5 and outs["normal"].abs().max() > 0
    assert not torch.equal(outs["default"], outs["normal"])
    with pytest.raises(ValueError, match="init"):
        trim_({"weight": lin.weight}, {"weight": torch.ones(8, 8, dtype=torch.bool)}, init="xavier")


@pytest.mark.parametrize("init", ["default", "uniform", "normal", "zero"])
def test_trim_norm_scales_and_biases(init):
    """Norm scales go to 1 and norm biases to 0 under every init but zero (pruning: all zero); a Linear / Conv bias
    is zero under default, else drawn with its *weight's* fan-in (PyTorch's bias init), never with its own shape."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
                          nn.LayerNorm(16), nn.Linear(16, 64))
    params = dict(model.named_parameters())
    for p in params.values():
        torch.nn.init.constant_(p, 7.0)
    trim_(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}, init=init, seed=2,
          kinds=module_kinds(model), fan_ins=bias_fan_ins(model))
    assert bias_fan_ins(model) == {"0.bias": 27, "4.bias": 128, "6.bias": 16}
    for norm in ("1", "2", "5"):
        assert (params[f"{norm}.weight"] == (0.0 if init == "zero" else 1.0)).all(), norm
        assert (params[f"{norm}.bias"] == 0).all(), norm
    for layer, fan_in in (("0", 27), ("4", 128), ("6", 16)):
        w, b = params[f"{layer}.weight"].detach(), params[f"{layer}.bias"].detach()
        if init in ("zero", "default"):
            assert (b == 0).all()
        else:
            assert b.abs().max() <= (fan_in ** -0.5 if init == "uniform" else 5 * fan_in ** -0.5 / 3 ** 0.5)
            assert b.std() > 0.2 * fan_in ** -0.5  # drawn at the weight's scale, not at 1/sqrt(len(bias))
        if init != "zero":
            assert 0 < w.abs().max() <= (fan_in ** -0.5 if init in ("default", "uniform") else 6 * fan_in ** -0.5 / 3 ** 0.5)


# -- saliency -------------------------------------------------------------------------------------------------
def test_saliency_equals_explicit_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.")}
    snip = saliency_scores(loss_fn, iter(data), params, num_batches=3, kind="snip", model=model)
    grad = saliency_scores(loss_fn, iter(data), params, num_batches=3, kind="grad", model=model)
    sum_abs = {n: torch.zeros_like(p) for n, p in params.items()}
    sum_g = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in data:
        gs = torch.autograd.grad(loss_fn(b), list(params.values()))
        for n, gg in zip(params, gs):
            sum_abs[n] += gg.abs()
            sum_g[n] += gg
    for n, p in params.items():
        assert torch.allclose(snip[n], (p.detach() * sum_abs[n]).abs(), atol=1e-7)
        assert torch.allclose(grad[n], sum_g[n].abs(), atol=1e-7)
        assert p.grad is None
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_saliency_sets_existing_gradients_aside_and_unscales():
    """A gradient already on a parameter is not folded into the first batch, and is back after the pass;
    a loss scale applied by ``backward`` (fp16 grad scaler) is divided out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(2)]
    loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1])
    params = dict(model.named_parameters())
    clean = saliency_scores(loss_fn, iter(data), params, num_batches=2, kind="grad", model=model)
    old = {n: torch.full_like(p, 3.0) for n, p in params.items()}
    for n, p in params.items():
        p.grad = old[n].clone()
    got = saliency_scores(loss_fn, iter(data), params, num_batches=2, kind="grad", model=model,
                          backward=lambda loss: (loss * 1024.0).backward(), grad_scale=1024.0)
    for n, p in params.items():
        torch.testing.assert_close(got[n], clean[n])
        assert torch.equal(p.grad, old[n])


def test_saliency_non_finite_gradient_names_the_batch():
    """An infinite / NaN folded gradient (e.g. an fp16 overflow) stops the pass with a FloatingPointError naming
    the batch and the tensor, instead of ranking inf first or failing later in the top-k."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    stream = EndlessStream(12, 4, stack_collate(x, y), seed=0)
    calls = []

    def loss_fn(b):
        calls.append(1)
        out = model(b[0])
        if len(calls) == 2:  # the second batch's gradient overflows
            out.register_hook(lambda g: g * float("inf"))
        return nn.functional.cross_entropy(out, b[1])

    params = dict(model.named_parameters())
    with pytest.raises(FloatingPointError, match=r"saliency batch 2 of 3 \(draw 1 of the saliency stream\) gave a non-finite gradient.*first 2\.(weight|bias)"):
        saliency_scores(loss_fn, stream, params, num_batches=3, kind="snip", model=model)
    assert all(p.grad is None and p.requires_grad for p in params.values())


def test_saliency_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)).train()
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    data = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    saliency_scores(lambda b: nn.functional.cross_entropy(model(b[0]), b[1]), iter(data), dict(model.named_parameters()),
                    num_batches=3, model=model)
    assert all(torch.equal(v, before[k]) for k, v in model[1].state_dict().items())
    assert model[1].training


def test_saliency_draws_fresh_batches():
    stream = EndlessStream(10, 2, lambda idx: idx, seed=0)
    seen = []
    saliency_scores(lambda b: (seen.append(tuple(b)) or torch.tensor(1.0, requires_grad=True)) * 1.0, stream, {}, num_batches=5)
    assert len(set(seen)) == 5 and sorted(i for b in seen for i in b) == list(range(10))


# -- targets --------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = nn.ModuleDict({"to_q": nn.Linear(2, 2), "to_k": nn.Linear(2, 2)})
        self.ff = nn.Linear(2, 2)


def test_targets_presets_regex_and_exclude():
    model = Toy()
    presets = {"xattn": r".*attn2\..*"}
    assert list(select_parameters(model, "xattn", presets=presets)) == ["attn2.to_q.weight", "attn2.to_q.bias", "attn2.to_k.weight", "attn2.to_k.bias"]
    assert list(select_parameters(model, r"ff\..*")) == ["ff.weight", "ff.bias"]
    assert list(select_parameters(model, "xattn", exclude=r".*\.bias", presets=presets)) == ["attn2.to_q.weight", "attn2.to_k.weight"]
    assert list(select_parameters(model, ["xattn", r"ff\.weight"], presets=presets))[-1] == "ff.weight"
    info = describe(select_parameters(model, "all"))
    assert info["num_tensors"] == 6 and info["num_parameters"] == 18


def test_targets_no_match_names_the_pattern():
    with pytest.raises(TargetError, match=r"'conv\.\*'"):
        select_parameters(Toy(), r"conv.*")
    with pytest.raises(TargetError, match="neither a preset"):
        select_parameters(Toy(), "attn2.(")


# -- streams --------------------------------------------------------------------------------------------------
def test_stream_reshuffles_and_resumes():
    x = torch.arange(7)
    s = EndlessStream(7, 3, stack_collate(x), seed=4)
    first = [next(s)[0].tolist() for _ in range(5)]
    flat = [i for b in first for i in b]
    assert sorted(flat[:7]) == list(range(7))  # the first epoch covers every example once
    t = EndlessStream(7, 3, stack_collate(x), seed=4)
    [next(t) for _ in range(2)]
    u = EndlessStream(7, 3, stack_collate(x), seed=4)
    u.load_state_dict(t.state_dict())
    assert [next(u)[0].tolist() for _ in range(3)] == first[2:]


def test_stream_shards_one_global_batch():
    single = EndlessStream(11, 4, lambda i: i, seed=1)
    ranks = [EndlessStream(11, 2, lambda i: i, seed=1, rank=r, world=2) for r in range(2)]
    for _ in range(6):
        assert next(single) == next(ranks[0]) + next(ranks[1])
    with pytest.raises(ValueError, match="empty"):
        EndlessStream(0, 2, lambda i: i, name="forget set")


def test_trim_sets_norm_scales_of_any_dimensionality_to_one():
    """A norm module's scale goes to 1 and its shift to 0 whatever the scale's shape: a LayerNorm over (4, 6), a
    per-expert RMSNorm with a (experts, dim) weight, a LayerNorm2d named so, a GlobalResponseNorm's (1, 1, 1, C)
    gamma / beta. Kaiming here would draw a multi-dimensional scale near 0 and switch features off."""

    class ExpertNorm(nn.Module):  # as transformers' ErgoExpertNorm: one RMSNorm scale per expert
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 6))

    class LayerNorm2d(nn.Module):  # as SAM's / ConvNeXt's channel LayerNorm
        def __init__(self):
            super().__init__()
            self.weight, self.bias = nn.Parameter(torch.ones(6)), nn.Parameter(torch.zeros(6))

    class GlobalResponseNorm(nn.Module):  # diffusers.models.normalization.GlobalResponseNorm
        def __init__(self):
            super().__init__()
            self.gamma, self.beta = nn.Parameter(torch.zeros(1, 1, 1, 6)), nn.Parameter(torch.zeros(1, 1, 1, 6))

    model = nn.ModuleDict({"ln": nn.LayerNorm((4, 6)), "expert": ExpertNorm(), "ln2d": LayerNorm2d(), "grn": GlobalResponseNorm(),
                           "lin": nn.Linear(6, 6)})
    params = dict(model.named_parameters())
    for p in params.values():
        torch.nn.init.constant_(p, 7.0)
    kinds = module_kinds(model)
    assert {kinds[n] for n in params if not n.startswith("lin")} == {"norm"} and kinds["lin.weight"] == "other"
    for init in ("default", "uniform", "normal"):
        trim_(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}, init=init, seed=1, kinds=kinds,
              fan_ins=bias_fan_ins(model))
        for n in ("ln.weight", "expert.weight", "ln2d.weight", "grn.gamma"):
            assert (params[n] == 1).all(), (init, n)
        for n in ("ln.bias", "ln2d.bias", "grn.beta"):
            assert (params[n] == 0).all(), (init, n)
        assert params["lin.weight"].abs().max() <= 6 ** -0.5 * (1 if init != "normal" else 5)  # a Linear is still drawn
