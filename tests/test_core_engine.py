"""The shared loop with every registered method on a tiny digits MLP (in process, one CPU)."""

import copy
import dataclasses

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
    method = build_method(name, topk=2.0, lam=0.05, forget_bound=3.0)
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


def test_resume_equals_uninterrupted_run(trained_mlp, digits_tensors, accelerator, tmp_path):
    import torch.nn as nn

    forget, retain = split(digits_tensors)

    def fresh():
        m = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
        m.load_state_dict(trained_mlp)
        return ClassifierAdapter(m, forget, retain, num_classes=10, batch_size=16)

    def cfg(out, steps, resume=None):
        return EngineConfig(output_dir=str(out), max_train_steps=steps, lr=1e-3, checkpointing_steps=3, progress=False,
                            resume_from_checkpoint=resume, seed=7)

    kw = dict(topk=5.0, lam=0.2, forget_bound=2.0, memory_refresh=2)
    full = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "a", 8), accelerator=accelerator)
    part = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "b", 3), accelerator=accelerator)
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-3", "checkpoint-6"]
    assert list_checkpoints(tmp_path / "b") == []  # no checkpoint at the final step: the export is the final state
    run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "c", 6), accelerator=accelerator)
    resumed = run(fresh(), build_method("scissorhands", **kw), cfg(tmp_path / "c", 8, resume="latest"), accelerator=accelerator)
    assert resumed.resumed_from.endswith("checkpoint-3")
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
