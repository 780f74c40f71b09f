"""erase.core overhead on a mid-size CPU model.

(a) time of one Scissorhands repair step through the shared engine vs. the bare passes that step needs, written
    in plain PyTorch in the same run (memory forward+backward, forget and retain forwards, one backward, SGD
    update; the memory gradient is kept as computed, not copied). Each step is timed on its own (engine: between
    consecutive ``before_step`` calls); the figure is the ratio of the medians over interleaved repeats, so set-up
    cost and bursts of machine noise drop out. ``--clock cpu`` times the process's CPU time instead of wall time.
(b) peak memory of the trim (SNIP saliency + global top-k + re-init) vs. the model's parameter bytes, each in a
    fresh subprocess, against the reference recipe (keep .grad, score tensors, ``torch.cat`` + ``topk``).

    python benchmarks/core_overhead.py [--width 1024] [--depth 6] [--batch 256] [--steps 20] [--repeats 3] [--clock cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.inputs import check_counts, check_json_output, has_keys  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402


def make_model(width: int, depth: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, d = [], 64
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def engine_steps(args, steps: int) -> list[float]:
    """Seconds of each Scissorhands step through ``erase.core.run``: the time between consecutive ``before_step``
    calls, so everything the loop does per step counts (the first step, which warms up, is dropped)."""
    from accelerate import Accelerator

    from classify.adapter import ClassifierAdapter
    from erase.core import EngineConfig, build_method, run

    model = make_model(args.width, args.depth)
    x, y = make_data(4 * args.batch)
    adapter = ClassifierAdapter(model, (x[: args.batch], y[: args.batch]), (x[args.batch :], y[args.batch :]), 10, args.batch)
    method = build_method("scissorhands", ablation="no_trim", lam=0.1, memory_refresh=1)
    clock, stamps, inner = CLOCKS[args.clock], [], method.before_step

    def stamped(ctx, model, step):
        stamps.append(clock())
        return inner(ctx, model, step)

    method.before_step = stamped
    cfg = EngineConfig(output_dir="/tmp/core_overhead", max_train_steps=steps + 2, lr=1e-3, optimizer="sgd", momentum=0.0,
                       progress=False, log_every=10**9)
    run(adapter, method, cfg, accelerator=Accelerator(cpu=True))
    return [b - a for a, b in zip(stamps, stamps[1:])][1:]


def bare_steps(args, steps: int) -> list[float]:
    model = make_model(args.width, args.depth)
    x, y = make_data(4 * args.batch)
    fx, fy, rx, ry = x[: args.batch], y[: args.batch], x[args.batch :], y[args.batch :]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    clock, times = CLOCKS[args.clock], []
    for s in range(steps + 1):
        t = clock()
        # memory gradient: one forward + backward on a forget batch (kept as computed, no copy)
        (-F.cross_entropy(model(fx), fy)).backward()
        mem = [p.grad for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        i = torch.randint(0, len(ry), (args.batch,))
        loss = F.cross_entropy(model(rx[i]), ry[i]) - 0.1 * F.cross_entropy(model(fx), fy)
        loss.backward()
        del mem
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(clock() - t)
    return times[1:]


def peak_child(mode: str, args) -> dict:
    """Run one trim recipe in a fresh process; report peak RSS above the pre-model baseline."""
    code = f"""
import sys, json, resource, torch
sys.path.insert(0, {str(ROOT)!r})
torch.set_num_threads(2)
from benchmarks.core_overhead import make_model, make_data, trim_{mode}
import erase.core, torch.nn.functional  # libraries load before the baseline is read
import psutil, threading
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
stop = False
def watch():
    while not stop:
        peak[0] = max(peak[0], proc.memory_info().rss)
model = make_model({args.width}, {args.depth})
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
t = threading.Thread(target=watch, daemon=True); t.start()
after_model = proc.memory_info().rss
trim_{mode}(model, make_data(64, 1), {args.topk})
stop = True; t.join()
print(json.dumps({{"param_bytes": param_bytes, "peak_over_base": peak[0] - base, "model_rss": after_model - base}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def trim_ours(model, data, topk):
    """What Scissorhands' prepare does: SNIP scores, then masks made one at a time, each applied and dropped."""
    from erase.core.saliency import saliency_scores
    from erase.core.topk import iter_topk_masks
    from erase.core.trim import trim_

    x, y = data
    params = dict(model.named_parameters())
    batches = iter([(x[i::4], y[i::4]) for i in range(4)])
    scores = saliency_scores(lambda b: F.cross_entropy(model(b[0]), b[1]), batches, params, num_batches=4, model=model)
    trim_(params, iter_topk_masks(scores, topk, release=True))


def trim_reference(model, data, topk):
    """The reference recipe: accumulate |grad| in .grad-sized tensors, score, torch.cat, topk threshold, mask."""
    x, y = data
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i::4]), y[i::4]).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.abs()
    scores = {n: (p.detach() * acc[n]).abs() for n, p in model.named_parameters()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = int(round(flat.numel() * topk / 100))
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    with torch.no_grad():
        for n, p in model.named_parameters():
            m = scores[n] >= threshold
            p[m] = torch.empty_like(p).uniform_(-0.01, 0.01)[m]


@cli_errors
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--topk", type=float, default=10.0)
    ap.add_argument("--mem_width", type=int, default=4096, help="Width of the model for the memory measurement.")
    ap.add_argument("--mem_depth", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 on a loaded shared machine).")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall: elapsed time; cpu: this process's CPU time "
                    "(with --threads 1, what other jobs on a shared machine disturb least).")
    ap.add_argument("--json", type=str, default=None, help="Write the figures here.")
    args = ap.parse_args(argv)
    from erase.utils.checks import check_numbers

    check_numbers(args)  # --topk in (0, 100], finite (erase.utils.checks.OPTION_RANGES)
    check_counts(args, width=1, depth=1, batch=1, steps=1, repeats=1, mem_width=1, mem_depth=1, threads=1)
    check_json_output("--json", args.json, has_keys("step", "trim_memory"))  # never over a file this tool did not write
    torch.set_num_threads(args.threads)

    engine, bare = [], []
    for _ in range(args.repeats):  # interleaved so machine noise hits both alike
        engine += engine_steps(args, args.steps)
        bare += bare_steps(args, args.steps)
    e, b = statistics.median(engine), statistics.median(bare)
    n_params = sum(p.numel() for p in make_model(args.width, args.depth).parameters())

    mem_args = argparse.Namespace(width=args.mem_width, depth=args.mem_depth, topk=args.topk)
    ours, ref = peak_child("ours", mem_args), peak_child("reference", mem_args)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}, load avg {os.getloadavg()[0]:.1f}",
        "step": {"params": n_params, "batch": args.batch, "clock": args.clock, "engine_s": e, "bare_s": b, "ratio": e / b,
                 "engine_min_s": min(engine), "bare_min_s": max(1e-12, min(bare)),
                 "ratio_of_minima": min(engine) / max(1e-12, min(bare)), "steps_timed": len(engine)},
        "trim_memory": {
            "param_bytes": ours["param_bytes"],
            "ours_peak_x_params": ours["peak_over_base"] / ours["param_bytes"],
            "reference_peak_x_params": ref["peak_over_base"] / ref["param_bytes"],
        },
    }
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
