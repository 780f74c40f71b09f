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


def _digits_model():
    from eval.digits.model import DigitsModelConfig

    cfg = DigitsModelConfig()
    return cfg, USER_CACHE / "digits" / f"model-{cfg.fingerprint()}"


#: the background process training the digits model, when a selected test needs it and the cache has none
_BACKGROUND: dict = {}


@pytest.hookimpl(trylast=True)  # after -k / -m deselect, so a deselected test starts no training
def pytest_collection_modifyitems(session, config, items):
    """Tests that need the trained digits model run last, and the model (when the cache has none, as on a fresh machine)
    trains meanwhile in a background process. With pytest-xdist (README's command: two workers) every worker collects
    and reorders alike, and only the first starts the training: a worker whose test needs the model meanwhile waits on
    the cache entry's build lock (erase/utils/files.build_lock), then finds it cached."""
    needs = [it for it in items if "digits_base_model" in getattr(it, "fixturenames", ())]
    if not needs:
        return
    items[:] = [it for it in items if "digits_base_model" not in getattr(it, "fixturenames", ())] + needs
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    from eval.digits.model import is_trained

    cfg, path = _digits_model()
    if is_trained(path, cfg):
        return
    import subprocess
    import tempfile

    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
            "from eval.digits.model import DigitsModelConfig, train_digits_model; "
            "train_digits_model(DigitsModelConfig(), Path(sys.argv[2]), progress=False)")
    log = tempfile.NamedTemporaryFile("w+", prefix="digits-model-", suffix=".log", delete=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    _BACKGROUND.update(proc=subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(path)], cwd=ROOT, env=env,
                                             stdout=log, stderr=subprocess.STDOUT), log=log.name, path=path)


def pytest_sessionfinish(session, exitstatus):
    """A background training still running when the session ends early (-x, an interrupt) is stopped, its folder
    removed; under xdist a worker that ran its share to the end waits for it instead, since the test that needs it
    may be the other worker's."""
    proc = _BACKGROUND.pop("proc", None)
    if proc is not None and "PYTEST_XDIST_WORKER" in os.environ and not (session.shouldstop or session.shouldfail):
        proc.wait()
        Path(_BACKGROUND["log"]).unlink(missing_ok=True)
    if proc is not None and proc.poll() is None:
        import shutil

        proc.kill()
        proc.wait()
        path = _BACKGROUND["path"]
        shutil.rmtree(path.parent / f"{path.name}.tmp-{proc.pid}", ignore_errors=True)


@pytest.fixture(scope="session")
def digits_base_model():
    """The default digits model of ``python -m eval.digits train`` (the quick start's base), found in the user's cache or
    trained into it on first use (about 2 minutes on 2 cores; started in the background at collection, above): tests
    that need a model that really draws digits take it from here, never from what another test or command happened to
    leave behind."""
    from eval.digits.model import train_digits_model

    proc = _BACKGROUND.pop("proc", None)
    if proc is not None:
        log = Path(_BACKGROUND["log"])
        if proc.wait() != 0:  # trained here instead, and the background's output says why it failed
            print(log.read_text()[-3000:], file=sys.stderr)
        log.unlink(missing_ok=True)
    cfg, path = _digits_model()
    return train_digits_model(cfg, path, progress=False)
