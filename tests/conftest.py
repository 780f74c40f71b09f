"""Shared offline fixtures: everything is built in code, nothing comes from a hub."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
#: the model cache as the session found it (some fixtures point ERASE_CACHE at a private folder while they run)
USER_CACHE = Path(os.environ.get("ERASE_CACHE") or Path.home() / ".cache" / "scissorhands")


@pytest.fixture(scope="session")
def digits_tensors():
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.fixture(scope="session")
def trained_mlp(digits_tensors):
    """A small MLP trained on digits (state dict), reused by engine tests."""
    import torch
    import torch.nn as nn

    x, y = digits_tensors
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(250):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def mlp(trained_mlp):
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    model.load_state_dict(trained_mlp)
    return model


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_test_process():
    """Tiny models run fastest on one thread; on a shared 2-core machine more threads oversubscribe badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline folder (eval.tiny), shared by the erase/sd.py tests."""
    from eval.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def digits_base_model():
    """The default digits model of ``python -m eval.digits train`` (the quick start's base), found in the user's cache or
    trained into it on first use (about 2 minutes on 2 cores): tests that need a model that really draws digits take
    it from here, never from what another test or command happened to leave behind."""
    from eval.digits.model import DigitsModelConfig, train_digits_model

    cfg = DigitsModelConfig()
    return train_digits_model(cfg, USER_CACHE / "digits" / f"model-{cfg.fingerprint()}", progress=False)
