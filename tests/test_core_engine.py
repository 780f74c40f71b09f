"""The shared loop with every registered method on a tiny digits MLP (in process, one CPU)."""

import copy
import dataclasses
import json

import pytest
import torch
from accelerate import Accelerator

from classify.adapter import ClassifierAdapter
from erase.core import EngineConfig, NonFiniteLossError, available_methods, build_method, run
from erase.core.engine import list_checkpoints
from erase.core.registry import get_method_class, register_method


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def split(digits_tensors, cls=3):
    x, y = digits_tensors
    f = y == cls
    return (x[f], y[f]), (x[~f], y[~f])


def accuracy(model, data):
    x, y = data
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_registry_lists_methods_by_task():
    assert {"scissorhands", "ft", "ga", "salun", "l1sparse", "retrain", "esd"} <= set(available_methods())
    assert "esd" not in available_methods("classify") and "retrain" not in available_methods("diffusion")
    with pytest.raises(KeyError, match="unknown method 'nope'.*available: .*scissorhands"):
        get_method_class("nope")


def test_registry_refuses_duplicates_and_bad_names():
    @dataclasses.dataclass
    class C:
        pass

    with pytest.raises(ValueError, match="registered twice"):
        register_method(type("Dup", (), {"name": "ga", "config_cls": C, "tasks": ()}))
    with pytest.raises(ValueError, match="lower-case name"):
        register_method(type("Bad", (), {"name": "Bad-Name", "config_cls": C}))


def test_ga_forgets_and_untargeted_parameters_stay_bit_identical(mlp, digits_tensors, accelerator, tmp_path):
    forget, retain = split(digits_tensors)
    before = copy.deepcopy(mlp.state_dict())
    acc_before = accuracy(mlp, forget)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    res = run(adapter, build_method("ga"), EngineConfig(output_dir=str(tmp_path), targets=r"2\..*", max_train_steps=30, lr=1e-2,
                                                         progress=False), accelerator=accelerator)
    assert acc_before > 0.8 and accuracy(res.model, forget) < 0.2
    after = res.model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])
    assert res.targets["tensors"] == {"2.weight": [10, 48], "2.bias": [10]}


@pytest.mark.parametrize("name", ["scissorhands", "salun", "ft", "l1sparse", "retrain"])
def test_each_method_runs_and_keeps_retain(name, mlp, digits_tensors, accelerator, tmp_path):
    forget, retain = split(digits_tensors)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    steps = 200 if name == "retrain" else 25
    options = {"topk": 2.0, "lam": 0.05, "forget_bound": 3.0}
    own = {f.name for f in dataclasses.fields(get_method_class(name).config_cls)}
    method = build_method(name, **{k: v for k, v in options.items() if k in own})
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=steps, lr=1e-2 if name == "retrain" else 2e-3,
                                            progress=False, log_every=5), accelerator=accelerator)
    assert accuracy(res.model, retain) > 0.8
    assert res.history and res.history[-1]["step"] == steps and all("loss" in h for h in res.history)
    if name == "scissorhands":
        trim = res.prepare_info["trim"]["summary"]
        assert trim["reset"] == round(0.02 * trim["targeted"])
        assert any(h.get("projected") is not None for h in res.history)
    if name in ("scissorhands", "salun", "retrain"):
        assert accuracy(res.model, forget) < 0.9


def test_salun_updates_only_masked_entries(mlp, digits_tensors, accelerator, tmp_path):
    forget, retain = split(digits_tensors)
    before = copy.deepcopy(mlp.state_dict())
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    method = build_method("salun", mask_ratio=10.0)
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=5, lr=1e-3, optimizer="sgd", momentum=0.0,
                                            progress=False), accelerator=accelerator)
    for n, p in res.model.named_parameters():
        changed = p.detach() != before[n]
        assert not (changed & ~method.masks[n]).any()


@pytest.mark.parametrize("project", [True, False])
def test_projection_keeps_forget_loss_from_dropping(project, mlp, digits_tensors, accelerator, tmp_path):
    """λ=0 and no trim: one SGD step on L_r. Projected, it cannot lower L_f on the memory batch (to first order);
    unprojected, fine-tuning on data like the forget set does lower it."""
    x, y = digits_tensors
    forget, retain = (x[:120], y[:120]), (x[120:], y[120:])
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=120)

    def lf(model):
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(forget[0]), forget[1]))

    before = lf(mlp)
    method = build_method("scissorhands", lam=0.0, ablation="no_trim", project=project)
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=1, lr=0.05, optimizer="sgd", momentum=0.0,
                                            progress=False), accelerator=accelerator)
    after = lf(res.model)
    if project:
        assert res.history[-1]["projected"] == 1.0 and res.history[-1]["dot_before"] < 0
        assert after >= before - 1e-4
    else:
        assert "projected" not in res.history[-1] and after < before - 1e-4


def trained_adapter(trained_mlp, digits_tensors) -> ClassifierAdapter:
    """A fresh copy of the trained digits MLP, forgetting the threes."""
    import torch.nn as nn

    forget, retain = split(digits_tensors)
    m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    m.load_state_dict(trained_mlp)
    return ClassifierAdapter(m, forget, retain, num_classes=10, batch_size=16)


def checkpointed(out, steps, resume=None, seed=7) -> EngineConfig:
    return EngineConfig(output_dir=str(out), max_train_steps=steps, lr=1e-3, checkpointing_steps=3, progress=False,
                        resume_from_checkpoint=resume, seed=seed)


def test_resume_equals_uninterrupted_run(trained_mlp, digits_tensors, accelerator, tmp_path):
    def fresh():
        return trained_adapter(trained_mlp, digits_tensors)

    cfg = checkpointed

    kw = dict(topk=5.0, lam=0.2, forget_bound=2.0, memory_refresh=2)
    full = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "a", 8), accelerator=accelerator)
    part = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "b", 3), accelerator=accelerator)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-3", "checkpoint-6"]
    assert list_checkpoints(tmp_path / "b") == []  # no checkpoint at the final step: the export is the final state
    run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "c", 6), accelerator=accelerator)
    resumed = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "c", 8, resume="latest"), accelerator=accelerator)
    assert resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.method_summary == full.method_summary and full.method_summary["update_checked"] == 8  # counters resume too
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert not torch.equal(part.model.state_dict()["0.weight"], full.model.state_dict()["0.weight"])


def test_non_finite_loss_stops_with_clear_message(mlp, digits_tensors, accelerator, tmp_path):
    forget, retain = split(digits_tensors)
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=32)
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf|-inf) at step \d+"):
        run(adapter, build_method("ga"), EngineConfig(output_dir=str(tmp_path), max_train_steps=20, lr=1e30, progress=False),
            accelerator=accelerator)


def test_engine_config_validates():
    with pytest.raises(ValueError, match="optimizer 'rmsprop'"):
        EngineConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="mixed_precision"):
        EngineConfig(mixed_precision="fp8")


# -- Scissorhands' repair: the guarantee for the applied step, memories, BatchNorm, the forget schedule ---------
class MeasuredScissorhands(get_method_class("scissorhands")):
    """Scissorhands that also measures, on its own, ⟨∇L_f, Δθ⟩ / (‖Δθ‖‖g_o‖) of every applied projected step."""

    def __init__(self, config):
        super().__init__(config)
        self.snap, self.rel = None, []

    def after_backward(self, ctx, model, step):
        out = super().after_backward(ctx, model, step)
        self.snap = [p.detach().clone() for p in ctx.params.values()] if "projected" in out else None
        return out

    def after_step(self, ctx, model, step):
        out = super().after_step(ctx, model, step)
        if self.snap is not None:
            rise = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(self.snap, ctx.params.values())])  # −Δθ
            for mem in self.memories:
                g_o = torch.cat([m.reshape(-1) for m in mem])
                self.rel.append(float(rise @ g_o) / float(rise.norm() * g_o.norm()))
        return out


def digits_double(trained_mlp, digits_tensors):
    import torch.nn as nn

    x, y = digits_tensors
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    model.load_state_dict(trained_mlp)
    forget = torch.arange(len(y)) % 10 == 0  # a random-like forget set: D_r holds data like it, so fine-tuning lowers L_f
    x = x.double()
    return ClassifierAdapter(model.double(), (x[forget], y[forget]), (x[~forget], y[~forget]), num_classes=10, batch_size=32)


@pytest.mark.parametrize("optimizer,lr", [("adam", 2e-3), ("sgd", 2e-2)])
@pytest.mark.parametrize("project_update", [True, False])
def test_projection_holds_for_the_applied_step(optimizer, lr, project_update, trained_mlp, digits_tensors, accelerator, tmp_path):
    """Adam and SGD with momentum 0.9 apply a step other than −lr·g̃: on some projected steps it lowers the memory
    forget loss to first order. With the correction after optimizer.step() none does (float64: exact up to 1e-9)."""
    from erase.core.methods.scissorhands import ScissorhandsConfig

    method = MeasuredScissorhands(ScissorhandsConfig(lam=0.0, ablation="no_trim", project_update=project_update))
    res = run(digits_double(trained_mlp, digits_tensors), method,
              EngineConfig(output_dir=str(tmp_path), max_train_steps=40, lr=lr, optimizer=optimizer, momentum=0.9, progress=False,
                           log_every=1), accelerator=accelerator)
    counts = res.method_summary
    assert len(method.rel) == 40 and counts["update_checked"] == 40 and counts["projection_steps"] == 40
    assert counts["update_violated"] >= 4  # measured before the correction, with or without it
    assert all({"update_projected", "update_dot_before", "update_dot_after"} <= set(r) for r in res.history)
    if project_update:
        assert min(method.rel) >= -1e-9
        assert counts["update_violated_after"] == 0 and counts["update_corrected"] >= counts["update_violated"]
        assert sum(r["update_projected"] for r in res.history) == counts["update_corrected"]
        assert min(r["update_dot_after"] for r in res.history) >= -1e-12
    else:
        assert sum(r < -1e-6 for r in method.rel) == counts["update_violated"] == counts["update_violated_after"]
        assert counts["update_corrected"] == 0


def test_non_finite_memory_is_not_used(mlp, digits_tensors, accelerator, tmp_path):
    """A memory gradient with inf / NaN (e.g. an fp16 overflow) is dropped: no projection on that step, counted and
    logged; the run goes on with finite weights."""
    forget, retain = split(digits_tensors)

    class Overflowing(ClassifierAdapter):
        calls = 0

        def forget_loss(self, model, batch):  # with λ = 0 and no trim, only the memory pass calls it
            Overflowing.calls += 1
            loss = super().forget_loss(model, batch)
            if Overflowing.calls % 2 == 0:
                loss.register_hook(lambda g: g * float("inf"))
            return loss

    adapter = Overflowing(mlp, forget, retain, num_classes=10, batch_size=32)
    res = run(adapter, build_method("scissorhands", lam=0.0, ablation="no_trim"),
              EngineConfig(output_dir=str(tmp_path), max_train_steps=6, lr=1e-3, progress=False, log_every=1), accelerator=accelerator)
    assert res.method_summary["memory_non_finite"] == 3 and res.method_summary["projection_steps"] == 3
    dropped = [r for r in res.history if r.get("memory_non_finite")]
    assert [r["step"] for r in dropped] == [2, 4, 6] and all("projected" not in r for r in dropped)
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_memory_pass_leaves_batchnorm_statistics_alone(digits_tensors, accelerator, tmp_path):
    """The saliency and memory passes run BatchNorm in eval mode: after N steps the running statistics are those
    of fine-tuning on the same N retain batches (the first BatchNorm sees the raw inputs, so they must be equal)."""
    import torch.nn as nn

    forget, retain = split(digits_tensors)
    torch.manual_seed(0)
    base = nn.Sequential(nn.BatchNorm1d(64), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    out = {}
    for name, kw in (("ft", {}), ("scissorhands", {"lam": 0.0, "topk": 5.0})):
        model = copy.deepcopy(base)
        res = run(ClassifierAdapter(model, forget, retain, num_classes=10, batch_size=16), build_method(name, **kw),
                  EngineConfig(output_dir=str(tmp_path / name), max_train_steps=5, lr=1e-3, progress=False), accelerator=accelerator)
        out[name] = res.model
    for bn in (0, 2):
        assert int(out["scissorhands"][bn].num_batches_tracked) == 5 == int(out["ft"][bn].num_batches_tracked)
        assert out["scissorhands"][bn].training
    torch.testing.assert_close(out["scissorhands"][0].running_mean, out["ft"][0].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(out["scissorhands"][0].running_var, out["ft"][0].running_var, rtol=0, atol=0)


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_first_per_epoch_counts_micro_batches(lam, mlp, digits_tensors, accelerator, tmp_path):
    """forget_steps=first_per_epoch: with 2 micro-batches per step, a retain epoch of 8 micro-batches is 4 optimizer
    steps and the 2 forget micro-batches fall in its first step (steps 1, 5, 9). λ = 0 drops the forget term but
    keeps the projection on those steps, as under forget_steps=every."""
    x, y = digits_tensors
    forget, retain = (x[:16], y[:16]), (x[16:80], y[16:80])  # batch 8: 2 forget, 8 retain micro-batches per epoch
    adapter = ClassifierAdapter(mlp, forget, retain, num_classes=10, batch_size=8)
    method = build_method("scissorhands", lam=lam, ablation="no_trim", forget_steps="first_per_epoch")
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=10, lr=1e-3, gradient_accumulation_steps=2,
                                            progress=False, log_every=1), accelerator=accelerator)
    projected = [r["step"] for r in res.history if "projected" in r]
    with_term = [r["step"] for r in res.history if "forget_term" in r]
    assert projected == [1, 5, 9]
    assert with_term == ([1, 5, 9] if lam else [])


class Recording(ClassifierAdapter):
    """Records the labels of every forget batch the forget term sees (each example's label is its index here)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list[list[int]] = []

    def forget_term(self, kind, model, batch, bound=None, **kwargs):
        self.seen.append(batch[1].tolist())
        return super().forget_term(kind, model, batch, bound=bound, **kwargs)


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_forget_batches_are_drawn_only_when_used(lam, digits_tensors, accelerator, tmp_path):
    """forget_steps=first_per_epoch: the forget stream advances only on the steps whose loss uses a forget batch, so
    the forget micro-batches of each retain epoch are one pass over D_f (each example once); with λ = 0 nothing
    is drawn. A run resumed from a checkpoint draws the same batches and ends with the same weights."""
    import torch.nn as nn

    x, y = digits_tensors
    forget = (x[:12], torch.arange(12) % 10)  # the label of example i is i % 10: batches say which examples they hold
    retain = (x[12:76], y[12:76])  # batch 4: 3 forget micro-batches, 16 retain micro-batches per epoch

    def fresh():
        torch.manual_seed(0)
        return Recording(nn.Sequential(nn.Linear(64, 10)), forget, retain, num_classes=10, batch_size=4)

    def cfg(out, steps, resume=None):
        return EngineConfig(output_dir=str(out), max_train_steps=steps, lr=1e-3, gradient_accumulation_steps=2, checkpointing_steps=5,
                            progress=False, log_every=1, resume_from_checkpoint=resume)

    kw = dict(lam=lam, ablation="no_trim", forget_steps="first_per_epoch", forget_bound=3.0)
    adapter = fresh()
    res = run(adapter, build_method("scissorhands", **kw), cfg(tmp_path / "a", 16), accelerator=accelerator)
    draws = [json.loads((tmp_path / "a" / f"checkpoint-{s}" / "erase_state.json").read_text())["streams"]["forget"]["draws"]
             for s in (5, 10)]
    if lam == 0.0:
        assert adapter.seen == [] and draws == [0, 0]
        return
    # 8 optimizer steps per retain epoch; its first 2 steps hold the first 3 retain micro-batches: 2 forget micro-batches
    # on each of steps 1, 2, 9, 10, and nothing drawn in between
    assert [r["step"] for r in res.history if "forget_term" in r] == [1, 2, 9, 10]
    assert draws == [4, 8] and len(adapter.seen) == 8
    every = sorted(int(v) for v in forget[1])
    assert sorted(i for b in adapter.seen[:3] for i in b) == every  # draws 0-2: the first pass over D_f
    assert sorted(i for b in adapter.seen[3:6] for i in b) == every  # draws 3-5: the second, across the two epochs
    part = fresh()
    run(part, build_method("scissorhands", **kw), cfg(tmp_path / "b", 10), accelerator=accelerator)
    resumed = fresh()
    out = run(resumed, build_method("scissorhands", **kw), cfg(tmp_path / "b", 16, resume="latest"), accelerator=accelerator)
    assert out.resumed_from.endswith("checkpoint-5")
    assert part.seen[:4] + resumed.seen == adapter.seen
    for a, b in zip(res.model.state_dict().values(), out.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("refresh", [1, 2])
def test_memories_are_checkpointed_only_when_a_resume_uses_them(refresh, trained_mlp, digits_tensors, accelerator, tmp_path):
    """memory_refresh=1 recomputes the memories at the first resumed step, so a checkpoint holds only the counters;
    memory_refresh=2 keeps them. A checkpoint that holds them anyway (written by an earlier version) still resumes to
    the uninterrupted run's weights."""
    from safetensors import safe_open

    def fresh():
        return trained_adapter(trained_mlp, digits_tensors)

    def cfg(out, steps, resume=None):
        return checkpointed(out, steps, resume, seed=3)

    kw = dict(topk=5.0, lam=0.2, memory_refresh=refresh)
    full = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "a", 5), accelerator=accelerator)
    with safe_open(str(tmp_path / "a" / "checkpoint-3" / "erase_state.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "counts" in keys and any(k.startswith("memory.") for k in keys) == (refresh > 1)

    class Older(get_method_class("scissorhands")):  # saves its memories whatever memory_refresh is
        def state_tensors(self):
            out = super().state_tensors()
            out.update({f"memory.{j}.{i}": t for j, mem in enumerate(self.memories) for i, t in enumerate(mem)})
            return out

    run(fresh(), Older(build_method("scissorhands", **kw).config), cfg(tmp_path / "b", 4), accelerator=accelerator)
    with safe_open(str(tmp_path / "b" / "checkpoint-3" / "erase_state.safetensors"), "pt") as f:
        assert any(k.startswith("memory.") for k in f.keys())
    resumed = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "b", 5, resume=str(tmp_path / "b" / "checkpoint-3")),
                  accelerator=accelerator)
    assert resumed.method_summary == full.method_summary
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
