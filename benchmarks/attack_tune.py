"""unlearndiffatk's optimiser, chosen on the tuning digits seven and one only, by a rule fixed before any run.

    OMP_NUM_THREADS=1 python benchmarks/attack_tune.py --output_dir /tmp/attack_tune [--jobs 2]

Why: the reference code's Adam (lr 0.01, weight decay 0.1, decay as L2 on the gradient) was tuned for its relaxed
one-hot variable; on our token embeddings the decay term is about as large as the loss gradient (the attack records
``decay_to_grad_median``), so the search may mostly shrink the embeddings.

Candidates (``--candidates``):
  ref      adam,  lr 0.01, weight decay 0.1  (the reference's text_grad settings)
  nodecay  adam,  lr 0.01, weight decay 0
  pez      adamw, lr 0.1,  weight decay 0.1  (PEZ's hard-prompt settings, Wen et al. 2023, decoupled decay)

Tuning models: the default digits model erased for ``seven`` and for ``one`` by ``scissorhands`` and by ``esd`` (seed 0,
100 steps, the data sizes and per-method flags of ``eval/digits/bench.py``; made here through
``eval.digits.bench.run_erasure`` and reused on a rerun). Attack: unlearndiffatk at its defaults (5 tokens, 40
iterations per block, judged after every block, first success counted) with ``--blocks`` 10 timestep blocks (400
iterations per restart, a fifth of the reference's 50 blocks: all this shared 2-core CPU affords for 12 runs),
``--restarts`` 2 and ``random_tries`` 1 (the random control is no part of the rule), the first ``--prompts`` 3 of the
digit's 6 forget prompts (the preset's order).

Rule (fixed before the first run): the default is the candidate with the highest mean ASR over the four tuning
models at the full budget; candidates within 0.02 of the best (less than one prompt-restart of the 24: an equal ASR) are tied, and a tie
goes to the larger mean of the ASR-vs-budget curve (the area under it: the attack that succeeds sooner), then to
``ref``. No evaluation digit (zero, two, three, four, five, six, eight, nine) is attacked here.

Writes OUTPUT_DIR/attack_tune.json (per candidate and model: ASR, the ASR-vs-budget curve, decay/gradient ratio,
seconds) and prints the markdown rows for benchmarks/RESULTS.md. A rerun reuses finished units.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.inputs import check_counts, check_folder_path, name_list  # noqa: E402
from erase.utils.errors import cli_errors  # noqa: E402
from erase.utils.files import atomic_write_json  # noqa: E402

CANDIDATES = {"ref": ("adam", 0.01, 0.1), "nodecay": ("adam", 0.01, 0.0), "pez": ("adamw", 0.1, 0.1)}
TUNING_DIGITS = ("seven", "one")
METHODS = ("scissorhands", "esd")
TIE = 0.02


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="erased models, audits and attack_tune.json")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated: " + ", ".join(CANDIDATES))
    p.add_argument("--restarts", type=int, default=2, help="unlearndiffatk restarts per prompt")
    p.add_argument("--blocks", type=int, default=10, help="unlearndiffatk timestep blocks (40 iterations each)")
    p.add_argument("--prompts", type=int, default=3, help="the first N forget prompts of the digit's preset")
    p.add_argument("--jobs", type=int, default=1, help="attack runs at once (each one torch thread)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one (candidate, model) audit
    a = p.parse_args(argv)
    a.candidate_list = name_list("--candidates", a.candidates, CANDIDATES, what="candidate")  # before any folder or job
    check_counts(a, restarts=1, blocks=1, prompts=1, jobs=1)
    check_folder_path("--output_dir", a.output_dir)
    return a


def erase_models(out: Path) -> dict[str, str]:
    from eval.digits.bench import run_erasure
    from eval.digits.model import DIGIT_WORDS, default_model_dir

    args = SimpleNamespace(launcher="python", max_train_steps=100, train_batch_size=16, num_forget_images=64,
                           num_retain_images=192, steps=20, guidance=4.0, erase_args=None)
    models = {}
    for digit in TUNING_DIGITS:
        for method in METHODS:
            if (out / "erased" / f"{method}-{digit}" / "erase_config.json").is_file():  # made earlier: reused
                models[f"{method}-{digit}"] = str(out / "erased" / f"{method}-{digit}")
                continue
            run_erasure(str(default_model_dir()), DIGIT_WORDS.index(digit), method, 0, out / "erased" / f"{method}-{digit}",
                        out / "data" / digit, args)
            models[f"{method}-{digit}"] = str(out / "erased" / f"{method}-{digit}")
    return models


def audit_one(out: Path, candidate: str, model_name: str, restarts: int, blocks: int, prompts: int) -> dict:
    import torch

    from eval.attack.unlearndiffatk import unlearndiffatk_audit
    from prompts import load_concept

    torch.set_num_threads(1)
    name, lr, wd = CANDIDATES[candidate]
    digit = model_name.split("-")[1]
    forget = out / "prompts" / f"{digit}-{prompts}.txt"
    forget.parent.mkdir(exist_ok=True)
    forget.write_text("".join(p + "\n" for p in load_concept(digit).forget_prompts[:prompts]))
    t0 = time.perf_counter()
    s = unlearndiffatk_audit(str(out / "erased" / model_name), digit, out / "audits" / f"{candidate}-{model_name}",
                             optimizer=name, lr=lr, weight_decay=wd, restarts=restarts, random_tries=1,
                             timestep_blocks=blocks, forget_prompts=str(forget))
    return {"asr": s["asr"], "asr_std": s["asr_std"], "asr_any_restart": s["asr_any_restart"], "pre_asr": s["pre_asr"],
            "curve": s["asr_curve"], "auc": round(sum(s["asr_curve"]["asr"]) / len(s["asr_curve"]["asr"]), 6),
            "decay_to_grad_median": s["decay_to_grad_median"], "block_loss": s["block_loss"],
            "attack_s_per_prompt": s["seconds"]["attack_per_prompt_mean"], "wall_s": round(time.perf_counter() - t0, 1)}


def choose(rows: dict) -> dict:
    """The rule of the module docstring on {candidate: {model: row}}."""
    mean = {c: sum(r["asr"] for r in m.values()) / len(m) for c, m in rows.items()}
    auc = {c: sum(r["auc"] for r in m.values()) / len(m) for c, m in rows.items()}
    best = max(mean.values())
    tied = [c for c in rows if mean[c] >= best - TIE]
    top = max(auc[c] for c in tied)
    winners = [c for c in tied if auc[c] == top]
    choice = "ref" if "ref" in winners else winners[0]
    return {"mean_asr": mean, "mean_auc": auc, "tied": tied, "choice": choice, "setting": CANDIDATES[choice]}


@cli_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    from erase.utils.launch import setup_logging

    setup_logging()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        candidate, model = args.one.split(":")
        (out / "rows").mkdir(exist_ok=True)
        atomic_write_json(out / "rows" / f"{candidate}-{model}.json", audit_one(out, candidate, model, args.restarts, args.blocks, args.prompts))
        return {}
    t0 = time.perf_counter()
    models = erase_models(out)
    cands = args.candidate_list
    jobs = [(c, m) for m in models for c in cands if not (out / "rows" / f"{c}-{m}.json").is_file()]
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for c, m in jobs:  # each (candidate, model) in its own process, --jobs at a time
        while len(running) >= max(1, args.jobs):
            running = [p for p in running if p.poll() is None]
            time.sleep(2)
        running.append(subprocess.Popen([sys.executable, __file__, "--output_dir", str(out), "--one", f"{c}:{m}",
                                         "--restarts", str(args.restarts), "--blocks", str(args.blocks),
                                         "--prompts", str(args.prompts)], env=env))
    for p in running:
        p.wait()
    rows = {c: {m: json.loads((out / "rows" / f"{c}-{m}.json").read_text()) for m in models} for c in cands}
    result = {"date": str(date.today()), "machine": platform.platform(), "cpu_count": os.cpu_count(),
              "command": " ".join(sys.argv), "candidates": {c: CANDIDATES[c] for c in cands}, "models": models,
              "restarts": args.restarts, "blocks": args.blocks, "prompts": args.prompts, "rows": rows, "decision": choose(rows),
              "wall_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "attack_tune.json", result)
    print("| candidate | " + " | ".join(models) + " | mean ASR | mean of the ASR curve | decay / gradient (median) |")
    print("|---|" + "---|" * (len(models) + 3))
    for c in cands:
        r = rows[c]
        ratios = [x["decay_to_grad_median"] for x in r.values() if x["decay_to_grad_median"] is not None]
        print(f"| {c} {CANDIDATES[c]} | " + " | ".join(f"{100 * r[m]['asr']:.1f}" for m in models)
              + f" | {100 * result['decision']['mean_asr'][c]:.1f} | {100 * result['decision']['mean_auc'][c]:.1f} | "
              + (f"{sorted(ratios)[len(ratios) // 2]:.2f}" if ratios else "–") + " |")
    print(json.dumps(result["decision"]))
    return result


if __name__ == "__main__":
    main()
