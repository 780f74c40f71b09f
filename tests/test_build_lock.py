"""One training per cache entry (erase/utils/files.build_lock): two commands that ask for the same model on a fresh
machine (two benches, two test workers) train it once; the second waits and then finds it cached, instead of
training again and replacing the folder under the first one's readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_digits import TINY

from erase.utils.files import build_lock

ROOT = Path(__file__).resolve().parents[1]

# a process that asks for the tiny digits model and says whether it trained it
ASK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import eval.digits.model as m
real = m._train_digits_model
def counted(*args, **kwargs):
    print("TRAINED", flush=True)
    return real(*args, **kwargs)
m._train_digits_model = counted
m.train_digits_model(m.DigitsModelConfig(**json.loads(sys.argv[3])), sys.argv[2], progress=False)
print("DONE", flush=True)
"""


def test_two_processes_asking_for_one_model_train_it_once(tmp_path):
    from eval.digits.model import DigitsModelConfig, is_trained

    path = tmp_path / "cache" / "model"
    logs = [tmp_path / f"ask-{i}.log" for i in range(2)]
    outs = [log.open("w") for log in logs]
    procs = []
    try:
        with build_lock(path):  # held here until both processes wait on it: the waiting path, not a lucky order
            procs = [subprocess.Popen([sys.executable, "-c", ASK, str(ROOT), str(path), json.dumps(TINY)], cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
                     for out in outs]
            deadline = time.time() + 120
            while not all("waiting for it" in log.read_text() for log in logs):
                assert time.time() < deadline and all(p.poll() is None for p in procs), [log.read_text() for log in logs]
                time.sleep(0.2)
        assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    finally:
        for p in procs:  # a failed check leaves no process behind
            p.kill()
            p.wait()
        for out in outs:
            out.close()
    said = [log.read_text().split() for log in logs]
    assert sum(words.count("TRAINED") for words in said) == 1 and all("DONE" in words for words in said), said
    assert is_trained(path, DigitsModelConfig(**TINY))
    assert sorted(p.name for p in path.parent.iterdir()) == [".model.lock", "model"]  # no second folder, no leftovers
