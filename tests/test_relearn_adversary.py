"""Scissorhands' weight-space adversary (``--relearn_radius``, erase/core/relearn.py): the forget term's gradient is
taken at the weights one relearning step reaches, the retain term's at the weights themselves, which are left exactly
as they were; in the engine the projection's guarantee still holds."""

import copy

import pytest
import torch
from accelerate import Accelerator

from classify.adapter import ClassifierAdapter
from erase.core import EngineConfig, build_method, run
from erase.core.method import RunContext


def split(digits_tensors, cls=3):
    x, y = digits_tensors
    f = y == cls
    return (x[f], y[f]), (x[~f], y[~f])


@pytest.mark.parametrize("forget_loss", ["ascent", "relabel"])
def test_forget_gradient_is_taken_one_relearning_step_ahead(forget_loss, mlp, digits_tensors):
    forget, retain = split(digits_tensors)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10)
    method = build_method("scissorhands", relearn_radius=0.05, lam=0.7, forget_loss=forget_loss, forget_bound=4.0)
    params = dict(mlp.named_parameters())
    ctx = RunContext(adapter, Accelerator(cpu=True), EngineConfig(output_dir="unused"), params, None, None, None, None, model=mlp)
    fb, rb = (forget[0][:24], forget[1][:24]), (retain[0][:40], retain[1][:40])
    before = {n: p.detach().clone() for n, p in params.items()}

    ref = copy.deepcopy(mlp)
    g = torch.autograd.grad(adapter.forget_loss(ref, fb), list(ref.parameters()))
    g_norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
    w_norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in ref.parameters()))
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for p, x in zip(moved.parameters(), g):
            p.sub_(x * float(0.05 * w_norm / g_norm))
    torch.manual_seed(3)  # relabel draws its wrong labels from torch's generator: the same draw on both sides
    term = adapter.forget_term(forget_loss, moved, fb, bound=4.0)
    expected = [a + b for a, b in zip(torch.autograd.grad(0.7 * term, list(moved.parameters())),
                                      torch.autograd.grad(adapter.retain_loss(ref, rb), list(ref.parameters())))]

    torch.manual_seed(3)
    loss, parts = method.loss(ctx, mlp, fb, rb)
    ctx.backward(loss)
    for (n, p), e in zip(params.items(), expected):
        assert torch.equal(p.detach(), before[n]), n  # θ exactly, after the move and back
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-5), n
    assert float(parts["relearn_step"]) == pytest.approx(0.05 * float(w_norm), rel=1e-6)
    assert float(loss.detach()) == pytest.approx(float(parts["retain_loss"] + 0.7 * parts["forget_term"]), rel=1e-6)


@pytest.mark.parametrize("which", ["rest", "all"])
def test_the_relearning_step_can_move_the_weights_the_erasure_does_not_train(which, mlp, digits_tensors):
    """relearn_params rest / all: the step down the concept's loss moves the untrained layer (and, for all, the target
    too); the forget term's gradient still fills the targets alone; every tensor and requires_grad flag comes back."""
    forget, retain = split(digits_tensors)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10)
    method = build_method("scissorhands", relearn_radius=0.04, relearn_params=which, lam=0.5, forget_loss="ascent",
                          forget_bound=4.0)
    mlp.requires_grad_(False)
    params = {n: p for n, p in mlp.named_parameters() if n.startswith("2.")}  # the targets: the last layer
    for p in params.values():
        p.requires_grad_(True)
    ctx = RunContext(adapter, Accelerator(cpu=True), EngineConfig(output_dir="unused"), params, None, None, None, None, model=mlp)
    fb, rb = (forget[0][:24], forget[1][:24]), (retain[0][:40], retain[1][:40])
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}

    ref = copy.deepcopy(mlp).requires_grad_(True)
    names = [n for n, _ in ref.named_parameters()]
    moving = [n for n in names if which == "all" or not n.startswith("2.")]
    g = dict(zip(names, torch.autograd.grad(adapter.forget_loss(ref, fb), list(ref.parameters()))))
    g_norm = torch.sqrt(sum((g[n].double() ** 2).sum() for n in moving))
    w_norm = torch.sqrt(sum((dict(ref.named_parameters())[n].detach().double() ** 2).sum() for n in moving))
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in moving:
                p.sub_(g[n] * float(0.04 * w_norm / g_norm))
    targets_moved = [p for n, p in moved.named_parameters() if n.startswith("2.")]
    targets_ref = [p for n, p in ref.named_parameters() if n.startswith("2.")]
    expected = [a + b for a, b in zip(torch.autograd.grad(0.5 * adapter.forget_term("ascent", moved, fb, bound=4.0), targets_moved),
                                      torch.autograd.grad(adapter.retain_loss(ref, rb), targets_ref))]

    loss, parts = method.loss(ctx, mlp, fb, rb)
    ctx.backward(loss)
    for n, p in mlp.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == n.startswith("2."), n
        assert (p.grad is None) != n.startswith("2."), n  # the untrained layer gets no gradient
    for p, e in zip(params.values(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6, rtol=1e-5)
    assert float(parts["relearn_step"]) == pytest.approx(0.04 * float(w_norm), rel=1e-6)


def test_relearn_params_without_a_radius_is_refused():
    with pytest.raises(ValueError, match="relearn_params 'rest' .* needs relearn_radius > 0"):
        build_method("scissorhands", relearn_params="rest")
    with pytest.raises(ValueError, match="relearn_params 'some' is not one of"):
        build_method("scissorhands", relearn_radius=0.01, relearn_params="some")


def test_engine_run_with_the_adversary_keeps_the_guarantee_and_forgets(mlp, digits_tensors, tmp_path):
    forget, retain = split(digits_tensors)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    res = run(adapter, build_method("scissorhands", relearn_radius=0.02, topk=5.0, forget_bound=3.0),
              EngineConfig(output_dir=str(tmp_path), max_train_steps=8, lr=1e-2, progress=False), accelerator=Accelerator(cpu=True))
    counts = res.method_summary
    assert counts["update_checked"] == 8 and counts["update_violated_after"] == 0
    assert all("relearn_step" in h for h in res.history if "forget_term" in h)
    with torch.no_grad():
        acc = float((res.model(forget[0]).argmax(1) == forget[1]).float().mean())
    assert acc < 0.5


def test_a_checkpoint_from_before_an_option_existed_resumes_only_at_its_default(tmp_path):
    """A method option added after a checkpoint was written is absent from its record: the run resumes when it keeps
    the option's default (the older version ran so), and is refused, naming the option, when it does not."""
    from erase.core.checkpoints import CheckpointError, check_resume, method_defaults, record

    old = record(build_method("scissorhands"), EngineConfig(), 1, {})
    for added in ("relearn_radius", "relearn_params", "null_space", "null_space_threshold"):
        old["method_config"].pop(added)
    state = {"step": 2, "record": old}
    plain = build_method("scissorhands")
    check_resume(state, record(plain, EngineConfig(), 1, {}), tmp_path, 4, defaults=method_defaults(plain))
    moved = build_method("scissorhands", relearn_radius=0.01)
    with pytest.raises(CheckpointError, match=r"relearn_radius \(not recorded\) -> 0.01"):
        check_resume(state, record(moved, EngineConfig(), 1, {}), tmp_path, 4, defaults=method_defaults(moved))
    with pytest.raises(CheckpointError, match="null_space"):  # without the defaults every unrecorded option differs
        check_resume(state, record(plain, EngineConfig(), 1, {}), tmp_path, 4)
