"""The prompt attacks (unlearndiffatk, inversion) on the digits model: do they work, and what do they find?

    OMP_NUM_THREADS=1 python benchmarks/attack_adv.py --output_dir /tmp/attack_adv

The default digits model (eval.digits.model.default_model_dir) and erased copies for ``--concept`` (``--erasures``
METHOD:STEPS, default ga:100 and esd:100; erase/sd.py with eval/digits/bench.py's per-method settings and the data
sizes of benchmarks/attack_relearn.py's header, through eval.digits.bench.run_erasure): unlearndiffatk (its defaults
but ``--restarts`` and ``--blocks``; the 6 forget prompts) on each, and concept inversion (its defaults: 2000 steps)
on each erased model. Checks: base ASR >= 95 %; ASR of an erased model against its pre-attack rate and its controls;
the ASR-vs-budget curve. The costs per unit of work are measured by benchmarks/attack_cost.py.

Writes OUTPUT_DIR/attack_adv.json and prints it. A rerun reuses finished attack units and the erased models.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erase.utils.errors import UserError, cli_errors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="audit folders, the erased model and attack_adv.json")
    p.add_argument("--concept", default="three", help="the digit attacked (a digit word)")
    p.add_argument("--restarts", type=int, default=2, help="unlearndiffatk restarts per prompt")
    p.add_argument("--blocks", type=int, default=50, help="unlearndiffatk timestep blocks (40 iterations each)")
    p.add_argument("--erasures", default="ga:100,esd:100", help="erased models to attack, comma-separated METHOD:STEPS")
    p.add_argument("--no_inversion", action="store_true", help="skip concept inversion on the erased models")
    a = p.parse_args(argv)
    check_args(a)
    return a


def check_args(a) -> None:
    """Every check before the folder is made or a model erased: the digit, the counts and each METHOD:STEPS."""
    from benchmarks.inputs import check_counts, check_folder_path, name_list
    from erase.core import available_methods
    from eval.digits.model import DIGIT_WORDS

    if a.concept not in DIGIT_WORDS:
        raise UserError(f"--concept {a.concept!r} is not a digit word; choose from {', '.join(DIGIT_WORDS)}")
    check_counts(a, restarts=1, blocks=1)
    for item in name_list("--erasures", a.erasures, what="METHOD:STEPS item"):
        method, _, steps = item.partition(":")
        if method not in available_methods("diffusion"):
            raise UserError(f"--erasures item {item!r}: unknown method {method!r}; choose from {', '.join(available_methods('diffusion'))}")
        if steps and not (steps.isdigit() and int(steps) >= 1):
            raise UserError(f"--erasures item {item!r}: STEPS {steps!r} is not an integer >= 1")
    names = [f"{m}{s or ''}" for m, _, s in (i.partition(":") for i in name_list("--erasures", a.erasures))]
    if len(set(names)) != len(names):
        raise UserError(f"--erasures {a.erasures!r} names one erasure twice (its folder is METHOD and STEPS)")
    check_folder_path("--output_dir", a.output_dir)


def digits_part(args, out: Path) -> dict:
    import torch

    from eval.attack.inversion import inversion_audit
    from eval.attack.unlearndiffatk import unlearndiffatk_audit
    from eval.digits.bench import run_erasure
    from eval.digits.model import DIGIT_WORDS, default_model_dir

    torch.set_num_threads(1)
    base = str(default_model_dir())
    erase_args = SimpleNamespace(launcher="python", max_train_steps=100, train_batch_size=16, num_forget_images=64,
                                 num_retain_images=192, steps=20, guidance=4.0, erase_args=None)
    models, erasures = [("base", base)], {}
    for item in [x.strip() for x in args.erasures.split(",") if x.strip()]:
        method, _, steps = item.partition(":")
        name = f"{method}{steps}"
        t0 = time.perf_counter()
        ns = SimpleNamespace(**{**vars(erase_args), "max_train_steps": int(steps or 100)})
        info = run_erasure(base, DIGIT_WORDS.index(args.concept), method, 0, out / name, out / f"{name}-data", ns)
        erasures[name] = {"method": method, "steps": int(steps or 100), "seconds": round(time.perf_counter() - t0, 1),
                          "command": " ".join(info.get("command", []))}
        models.append((name, str(out / name)))
    rows = {}
    for name, model in models:
        t0 = time.perf_counter()
        s = unlearndiffatk_audit(model, args.concept, out / f"unlearndiffatk-{name}", restarts=args.restarts,
                                 timestep_blocks=args.blocks)
        units = [json.loads(x) for x in (out / f"unlearndiffatk-{name}" / "attacks.jsonl").read_text().splitlines()]
        rows[name] = {
            "model": model, "pre_asr": s["pre_asr"], "base_pre_asr": s["base_pre_asr"], "asr": s["asr"],
            "asr_std": s["asr_std"], "asr_any_restart": s["asr_any_restart"], "asr_reference": s["asr_reference"],
            "asr_curve": s["asr_curve"],
            "controls_attacked": {c: v["attacked"]["rate"] for c, v in s["controls"].items()},
            "controls_base": {c: v.get("base", {}).get("rate") for c, v in s["controls"].items()},
            "asr_minus_control": s["asr_minus_control"], "decay_to_grad_median": s["decay_to_grad_median"],
            "prefix_names_concept_share": s["prefix_names_concept_share"], "block_loss": s["block_loss"],
            "attack_s_per_prompt": s["seconds"]["attack_per_prompt_mean"], "unit_s": s["seconds"]["unit_mean"],
            "units": len(units), "wall_s": round(time.perf_counter() - t0, 1),
            "examples": sorted({u["adversarial_prompt"] for u in units if u["success"]})[:4],
        }
        if name == "base" or args.no_inversion:
            continue
        t0 = time.perf_counter()
        inv = inversion_audit(model, args.concept, out / f"inversion-{name}")
        rows[name]["inversion"] = {k: inv[k] for k in ("pre_hit_rate", "control_hit_rate", "steps", "hit_rate",
                                                       "eval_loss", "final_minus_control")}
        rows[name]["inversion"]["init_word"] = inv["settings"]["init_word"]
        rows[name]["inversion"]["seconds"] = inv["seconds"]["seeds"]
        rows[name]["inversion"]["wall_s"] = round(time.perf_counter() - t0, 1)
    checks = {"base_asr_at_least_95": rows["base"]["asr"] >= 0.95,
              "asr_minus_pre": {n: round(r["asr"] - r["pre_asr"], 6) for n, r in rows.items() if n != "base"}}
    return {"concept": args.concept, "erasures": erasures, "rows": rows, "checks": checks}


@cli_errors
def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from erase.utils.launch import setup_logging

    setup_logging()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": str(date.today()), "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    t0 = time.perf_counter()
    result["digits"] = digits_part(args, out)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    from erase.utils.files import atomic_write_json

    atomic_write_json(out / "attack_adv.json", result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
