"""classify: data specs, models, metrics, caching, GA on a tiny model, and bad input (one line, non-zero, nothing written)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from classify.data import DataError, Split, forget_indices, load_data, parse_forget, split_forget, stratified_split
from classify.metrics import avg_gap, evaluate, mia_efficacy, summary
from classify.models import ResNet18, SmallCNN
from classify.protocol import TrainSettings, trained_reference
from classify.run import main, parse_args, parse_seeds
from classify.tune import choose
from eval_fixtures import error_text


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def test_digits_split_is_fixed_stratified_and_standardised(digits):
    again = load_data("digits")
    assert torch.equal(digits.test.y, again.test.y) and len(digits.train) + len(digits.test) == 1797
    assert digits.train.x.shape[1:] == (1, 8, 8)
    counts = np.bincount(digits.test.y.numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of every class
    assert abs(float(digits.train.x.mean())) < 1e-4 and abs(float(digits.train.x.std()) - 1) < 1e-2


def test_forget_sets(digits):
    spec = parse_forget("random:0.1", 10)
    f0, r0 = split_forget(digits.train, spec, 0)
    f1, _ = split_forget(digits.train, spec, 1)
    assert len(f0) == round(0.1 * len(digits.train)) and not set(f0) & set(r0) and len(f0) + len(r0) == len(digits.train)
    assert not np.array_equal(f0, f1)  # a new forget set per seed
    fc = forget_indices(digits.train.y, parse_forget("class:3", 10), 0)
    assert (digits.train.y[fc] == 3).all() and len(fc) == int((digits.train.y == 3).sum())
    rest, held = stratified_split(digits.train.y, 0.2, 5)
    assert not set(rest) & set(held) and len(rest) + len(held) == len(digits.train)


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,2,5") == [0, 2, 5] and parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("3-1", "a", "", "1,1"):
        with pytest.raises(DataError):
            parse_seeds(bad)


def test_models_shapes_and_presets():
    assert SmallCNN()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    net = ResNet18(100)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


def test_metrics_on_a_perfect_memoriser():
    class Lookup(torch.nn.Module):
        """Predicts the true label of training points (members) with confidence 1, test points with 0.5."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.full((len(x), 2), -30.0)
            member = x[:, 1] > 0
            logits[member, 0] = 30.0
            logits[~member] = 0.0
            return logits

    def split(n, member):
        return Split(torch.stack([torch.zeros(n), torch.full((n,), 1.0 if member else -1.0)], 1), torch.zeros(n, dtype=torch.long))

    m = evaluate(Lookup(), split(30, True), split(60, True), split(60, False))
    assert m["UA"] == 0.0 and m["RA"] == 100.0 and m["MIA"] == 0.0  # members all recognised
    m = evaluate(Lookup(), split(30, False), split(60, True), split(60, False))
    assert m["MIA"] == 100.0  # a forget set that looks like test data is called non-member
    assert mia_efficacy(torch.ones(50), torch.full((50,), 0.3), torch.full((10,), 0.31)) == 100.0
    assert avg_gap({"UA": 1, "RA": 99, "TA": 95, "MIA": 10}, {"UA": 3, "RA": 100, "TA": 96, "MIA": 6}) == pytest.approx(2.0)
    assert summary([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": pytest.approx(np.std([1, 2, 6], ddof=1)), "median": 2.0}


def test_tie_break_prefers_fewer_steps_then_lower_lr():
    scores = [{"hparams": {"lr": 1e-3, "max_train_steps": 200}, "mean": 0.501},
              {"hparams": {"lr": 1e-3, "max_train_steps": 100}, "mean": 0.499},
              {"hparams": {"lr": 3e-4, "max_train_steps": 100}, "mean": 0.503},
              {"hparams": {"lr": 1e-4, "max_train_steps": 10}, "mean": 0.9}]
    assert choose(scores)["hparams"] == {"lr": 3e-4, "max_train_steps": 100}


def test_reference_models_are_cached_by_settings(digits, tmp_path):
    train = TrainSettings(epochs=1).resolved("digits")
    idx = np.arange(200)
    a, info_a = trained_reference(digits, digits.train, idx, 7, train, tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob("*.pt"))
    b, info_b = trained_reference(digits, digits.train, idx, 7, train, tmp_path)  # loaded, not retrained
    assert info_a["key"] == info_b["key"] and info_a["wall_seconds"] == info_b["wall_seconds"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    trained_reference(digits, digits.train, idx, 8, train, tmp_path)  # another init seed: another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_ga_lowers_forget_accuracy_and_leaves_untargeted_parameters_bit_identical(digits, tmp_path):
    from erase.core import EngineConfig, build_method, run

    from classify.adapter import ClassifierAdapter
    from classify.metrics import accuracy

    model, _ = trained_reference(digits, digits.train, np.arange(len(digits.train)), 0, TrainSettings(epochs=4).resolved("digits"), None)
    f_idx, r_idx = split_forget(digits.train, parse_forget("random:0.1", 10), 0)
    forget, retain = digits.train.subset(f_idx), digits.train.subset(r_idx)
    before_acc = accuracy(model, forget)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = ClassifierAdapter(model, (forget.x, forget.y), (retain.x, retain.y), 10, batch_size=64)
    config = EngineConfig(output_dir=str(tmp_path), targets="fc", max_train_steps=15, lr=1e-3, progress=False)
    result = run(adapter, build_method("ga", task="classify"), config)
    assert accuracy(result.model, forget) < before_acc - 20
    for n, p in result.model.named_parameters():
        if n.startswith("conv"):
            assert torch.equal(p.detach(), before[n]), n
        else:
            assert not torch.equal(p.detach(), before[n]), n
    assert set(result.targets["tensors"]) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


BAD_INPUT = [
    (["--methods", "ft,dreambooth"], "unknown method 'dreambooth'", "scissorhands"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'", "cifar10"),
    (["--topk", "0"], "top-k 0.0 is outside (0, 100]", "(0, 100]"),
    (["--topk", "150"], "top-k 150.0 is outside (0, 100]", "(0, 100]"),
    (["--forget", "random:1.5"], "forget fraction 1.5", "(0, 1)"),
    (["--forget", "random:0"], "forget fraction 0.0", "(0, 1)"),
    (["--forget", "random:0.0001"], "forget set random:0.0001 is empty", "larger fraction"),
    (["--forget", "class:10"], "forget class 10", "0..9"),
    (["--forget", "class:-1"], "forget class -1", "0..9"),
]


@pytest.mark.parametrize("extra,names,allowed", BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(extra, names, allowed, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main(parse_args(["--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--seeds", "0", *extra]))
    message = error_text(err)
    assert message.startswith("error: ") and names in message and allowed in message and "\n" not in message
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bad_input_from_the_command_line_exits_non_zero_with_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "classify.run", "--forget", "class:12", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: forget class 12 in 'class:12' is out of range; allowed: 0..9"]
    assert not out.exists()


def test_hub_dataset_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_data("cifar10")
    assert "cifar10" in str(err.value) and "\n" not in str(err.value)


def test_topk_selecting_nothing_is_one_line(tmp_path):
    """--topk 1e-4 of the small CNN's ~38k weights rounds to 0 entries: one line naming the flag, not a silent no-op."""
    with pytest.raises(SystemExit) as err:
        main(parse_args(["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--seeds", "0",
                         "--methods", "scissorhands", "--ablations", "none", "--topk", "1e-4", "--ref_epochs", "1",
                         "--max_train_steps", "1"]))
    message = error_text(err)
    assert message.startswith("error: top-k 0.0001% of ") and "selects 0; raise --topk" in message and "\n" not in message
    assert not (tmp_path / "out" / "results.json").exists()  # the claimed folder holds no result
