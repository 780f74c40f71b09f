#!/usr/bin/env python
"""Every GPU figure of issues 10, 18 and 21 in one JSON, on one CUDA GPU, within a time budget (run by
``benchmarks/gpu.sh``; planned at about 6 minutes on one H100, capped at 9).

Models are built from the real configs of benchmarks/architectures.py (SD v1.4, SDXL base 1.0, SD3.5-medium,
SD3.5-large, FLUX.1-dev) with random weights, directly on the GPU: nothing is downloaded. The run is a list of *pieces*,
most important first (``--list`` prints them with their planned seconds), each measured by benchmarks/gpu_rows.py:

* ``repair:ARCH:bN[:ckpt]``: a default ``--concept nudity`` erasure's trim and repair steps through the run's own stages
  (Scissorhands, the family's ``xattn`` targets, top-k 2 %, redirect forget term, distill retain term, bf16 mixed
  precision, native resolution) at batch N, with or without gradient checkpointing: seconds, peak GPU memory (an
  out-of-memory row is recorded as such), and, for the MMDiT models, memory_plan.py's expectation beside it;
* ``generation:ARCH``: the family pipeline's throughput (the I2P protocol's LMS 50 steps for the UNets; flow-matching
  Euler at the pipeline's default steps and the family's guidance for SD3 / Flux);
* ``attacks:sd14``: the UNet and text-encoder passes one unlearndiffatk unit and one inversion step need (issue 21);
* ``detection``: NudeNet images/s;
* ``memory_plan``: benchmarks/memory_plan.py's whole table (CPU, meta device).

After every piece the JSON is rewritten (atomically): a run cut short keeps what it measured, and ``--resume`` finishes
it. Each architecture's ``erasure_estimate`` (a whole default erasure from its measured pieces) is recomputed as they
come in. A piece whose planned seconds (FLOPs counted on the meta device at the assumed H100 throughput, scaled by how
the finished pieces compared with their plan) would overrun ``--budget_s`` is skipped and recorded as such.

    python benchmarks/gpu_figures.py --output gpu_figures.json [--only PATTERN ...] [--skip PATTERN ...]
    python benchmarks/gpu_figures.py --list                      # the pieces and the H100 time plan; no GPU needed
    python benchmarks/gpu_figures.py --smoke --output /tmp/gpu_smoke.json   # tiny configs on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.architectures import ARCHS, MMDIT, SMOKE_ARCHS  # noqa: E402
from benchmarks.inputs import check_json_output, check_number, has_keys  # noqa: E402
from erase.utils.checks import Range  # noqa: E402
from erase.utils.errors import UserError, cli_errors  # noqa: E402

MMDIT_ORDER = ("sd35_medium", "sd35_large", "flux_dev")
UNET_ORDER = ("sd14", "sdxl")
#: pieces in the order they run: what issue 18 asks first (the MMDiT rows at batch 1 and what their estimate needs; each
#: carries its memory-plan expectation), then issue 21's attack passes and detection, memory_plan.py's whole table (CPU),
#: the UNet rows, and the larger batches last
PIECES = ([f"repair:{a}:b1:ckpt" for a in MMDIT_ORDER] + [f"repair:{a}:b1" for a in MMDIT_ORDER]
          + [f"generation:{a}" for a in MMDIT_ORDER] + ["attacks:sd14", "detection", "memory_plan"]
          + [p for a in UNET_ORDER for p in (f"repair:{a}:b1", f"repair:{a}:b1:ckpt")] + [f"generation:{a}" for a in UNET_ORDER]
          + [f"repair:{a}:b2:ckpt" for a in MMDIT_ORDER] + [p for a in UNET_ORDER for p in (f"repair:{a}:b8", f"repair:{a}:b8:ckpt")])
#: per mode: timed repair steps after warm-up, generation batch (UNet / MMDiT) and the step counts of its two timed
#: calls, attack pass repeats, detector images
SETTINGS = {"gpu": {"steps": 3, "warmup": 1, "gen_batch": {"unet": 16, "transformer": 2}, "gen_steps": (2, 10), "attack_repeats": 5,
                    "det_images": 64},
            "smoke": {"steps": 1, "warmup": 1, "gen_batch": {"unet": 2, "transformer": 2}, "gen_steps": (1, 2), "attack_repeats": 1,
                      "det_images": 4}}
#: what the time plan assumes (one H100 SXM: NVIDIA's datasheet peaks, dense bf16 / fp16 tensor cores and fp32 without
#: them; the shares of it un-compiled PyTorch sustains on these passes are assumptions, checked by every run: each piece
#: records its planned and its measured seconds); a forward + backward counts as 3 forwards
H100 = {"half_tflops": 989.0, "fp32_tflops": 67.0, "half_utilisation": 0.35, "fp32_utilisation": 0.6, "startup_s": 30.0,
        "build_s": 2.0, "build_s_per_billion_parameters": 0.5, "t5_build_s": 5.0, "memory_plan_s_per_model": 3.0, "detection_s": 10.0,
        "repair_overhead": 1.3, "forward_backward_in_forwards": 3}
DEFAULT_BUDGET_S = 540


def parse_piece(name: str) -> dict:
    kind, *rest = name.split(":")
    out = {"kind": kind, "arch": rest[0] if rest else None}
    if kind == "repair":
        out.update(batch=int(rest[1][1:]), checkpointing=rest[2:] == ["ckpt"], label=":".join(rest[1:]))
    return out


def select(only: list[str] | None, skip: list[str] | None) -> list[str]:
    """The pieces ``--only`` keeps (any pattern, fnmatch) less those ``--skip`` drops; a pattern that matches no piece is
    one line listing them."""
    for flag, patterns in (("--only", only), ("--skip", skip)):
        for pat in patterns or []:
            if not fnmatch.filter(PIECES, pat):
                raise UserError(f"{flag} {pat!r} matches no piece; pieces: {', '.join(PIECES)}")
    kept = [p for p in PIECES if only is None or any(fnmatch.fnmatch(p, pat) for pat in only)]
    return [p for p in kept if not any(fnmatch.fnmatch(p, pat) for pat in skip or [])]


# ---------------------------------------------------------------------------------------------------- the plan
@functools.lru_cache(maxsize=None)
def flops(arch) -> dict:
    from benchmarks.gpu_models import count_flops

    return count_flops(arch)


def repair_forwards(checkpointing: bool) -> tuple[int, int]:
    """Forward-equivalents of a repair step and of the trim, as the plan counts them: a step is the memory refresh, the
    redirect and the distill term, each a no-grad forward (anchor / frozen base) and a forward + backward (+ a
    recomputation with checkpointing); the trim is the method's saliency batches of the redirect term."""
    from erase.core.methods.scissorhands import ScissorhandsConfig

    one = 1 + H100["forward_backward_in_forwards"] + int(checkpointing)
    return 3 * one, ScissorhandsConfig().saliency_batches * one


def planned_seconds(name: str, archs: dict, settings: dict) -> float:
    """Seconds ``name`` should take on one H100 (see :data:`H100`): its passes x the FLOPs counted on the meta device /
    the assumed throughput, plus building its models."""
    p, h = parse_piece(name), H100
    half = h["half_tflops"] * 1e12 * h["half_utilisation"]
    fb = h["forward_backward_in_forwards"]
    if p["kind"] == "memory_plan":
        return h["memory_plan_s_per_model"] * len(MMDIT)
    if p["kind"] == "detection":
        return h["detection_s"]
    arch = archs[p["arch"]]
    f = flops(arch)
    build = h["build_s"] + h["build_s_per_billion_parameters"] * f["denoiser_parameters"] / 1e9
    if p["kind"] == "repair":
        step, trim = repair_forwards(p["checkpointing"])
        forwards = trim + (settings["warmup"] + settings["steps"]) * step
        return build + h["repair_overhead"] * forwards * p["batch"] * f["denoiser_forward"] / half
    if p["kind"] == "generation":
        from benchmarks.gpu_models import family_of
        from benchmarks.gpu_rows import generation_settings

        batch = settings["gen_batch"][family_of(arch).denoiser]
        steps = 1 + sum(settings["gen_steps"])
        work = steps * batch * generation_settings(arch)["passes_per_step"] * f["denoiser_forward"] + 3 * batch * f["vae_decode"]
        t5 = h["t5_build_s"] if arch.t5_tokens else 0.0  # the full text stack: T5-XXL alone is 4.7 B parameters
        return build + t5 + work / half
    if p["kind"] == "attacks":
        from benchmarks.gpu_rows import attack_budget

        b = attack_budget()  # per repeat and warm-up: bare UNet passes and chained iterations at each size, one selection
        forwards = (settings["attack_repeats"] + 1) * (2 * fb * sum(b["batch_sizes"]) + b["loss_eval_draws"])
        return build + forwards * f["denoiser_forward"] / (h["fp32_tflops"] * 1e12 * h["fp32_utilisation"])
    raise ValueError(f"unknown piece {name!r}")


def plan(pieces: list[str], archs: dict, settings: dict) -> dict:
    times = {p: planned_seconds(p, archs, settings) for p in pieces}
    return {"assumptions": H100, "pieces": times, "startup_s": H100["startup_s"], "total_s": H100["startup_s"] + sum(times.values()),
            "how": "per piece: its passes (repair: a step = 3 no-grad forwards + 3 forward+backward, +3 recomputations with "
                   "checkpointing; the trim = saliency batches x the same; generation: steps x batch x (2 with classifier-free "
                   "guidance) forwards + VAE decodes; attacks: fp32 passes) x the FLOPs of one forward counted on the meta "
                   "device (torch.utils.flop_counter) / (peak x utilisation), plus model building"}


# ------------------------------------------------------------------------------------------------- estimates
@functools.lru_cache(maxsize=None)
def memory_plan(name: str, batch: int, keep_text: bool) -> dict:
    """benchmarks/memory_plan.py's expected peak of a default erasure of the real model ``name`` at ``batch``, one GPU,
    native resolution (built on the meta device, buffers too: its counts need no values)."""
    from benchmarks.memory_plan import plan as plan_memory

    with torch.device("meta"):
        return plan_memory(name, processes=1, batch=batch, resolution=ARCHS[name].resolution, keep_text=keep_text)


def memory_expectation(name: str, batch: int) -> dict:
    """The plan's total beside a measured peak: ``expected_allocated_gib`` leaves out its CUDA context and allocator slack,
    which ``torch.cuda.max_memory_allocated`` does not see."""
    r = memory_plan(name, batch, False)
    slack = r["bytes"]["CUDA context and allocator slack (est.)"] / 2**30
    return {"expected_gib": r["total_gib"], "expected_allocated_gib": r["total_gib"] - slack, "expected_trim_peak_gib": r["trim_peak_gib"],
            "plan_assumes": "gradient checkpointing, text encoders and VAE on the CPU (benchmarks/memory_plan.py)"}


def erasure_estimate(arch, entry: dict, device_gib: float | None) -> dict:
    """A whole default erasure (erase/sd.py's defaults: ``--num_forget_images`` images at ``--num_inference_steps``,
    the trim, ``--max_train_steps`` steps at ``--train_batch_size``) from the measured pieces: the generation line at the
    data generation's step count, the trim's and the repair step's seconds of the batch row without checkpointing (the
    default) or, where that ran out of memory, with it. Model loading, latent and prompt encoding are not included."""
    from erase.diffusion.config import DataConfig, TrainConfig
    from erase.diffusion.validate import DEFAULT_REPAIR_STEPS

    d, t = DataConfig(), TrainConfig()
    steps = t.max_train_steps if t.max_train_steps is not None else DEFAULT_REPAIR_STEPS
    assumes = {"forget_images": d.num_forget_images, "data_steps": d.num_inference_steps, "repair_steps": steps,
               "train_batch_size": t.train_batch_size}
    rows = {k: r for k, r in entry.get("repair", {}).items() if r["batch"] == t.train_batch_size and "s_per_step" in r}
    label = next((k for k in sorted(rows, key=lambda k: rows[k]["gradient_checkpointing"])), None)
    gen = entry.get("generation") or {}
    missing = [what for what, ok in (("repair row at batch 1", label), ("generation", "seconds_per_image_at" in gen)) if not ok]
    if missing:
        return {"complete": False, "missing": missing, "assumes": assumes}
    row = rows[label]
    data_s = d.num_forget_images * gen["seconds_per_image_at"][str(d.num_inference_steps)]
    repair_s = steps * row["s_per_step"]
    total = data_s + row["prepare_s"] + repair_s
    out = {"complete": True, "assumes": assumes, "repair_row": label, "data_generation_s": data_s, "trim_s": row["prepare_s"],
           "repair_s": repair_s, "total_s": total, "total_minutes": total / 60, "peak_gpu_gib": row.get("peak_gpu_gib"),
           "note": f"the data generation at the audit sampler ({gen['sampler']}, batch {gen['batch']}) stands in for the run's "
                   "(--data_scheduler, --generation_batch_size 8); model loading, latent and prompt encoding not included"}
    if arch.target_minutes is not None:
        out.update(target_minutes=arch.target_minutes, target_gib=arch.target_gib)
        if out["peak_gpu_gib"] is not None:
            out["meets_targets"] = out["total_minutes"] <= arch.target_minutes and out["peak_gpu_gib"] <= arch.target_gib
    if device_gib is not None and out["peak_gpu_gib"] is not None:
        out["fits_device"] = out["peak_gpu_gib"] <= device_gib
    return out


def attack_costs(row: dict) -> dict:
    """The attacks' costs from their measured passes (formulas in the keys' ``how``)."""
    b, it, bare = row["budget"], row["iteration_s"], row["unet_forward_backward_s"]
    r, iters, draws, prompts = b["restarts"], b["iterations"], b["loss_eval_draws"], b["prompts"]
    sel = row["selection_forward_s"]
    judge_image_s = b["judge_steps"] * 2 * sel / draws  # 2 UNet forwards (guidance) per step, at the selection batch's per-row cost
    images = r * b["judged_images_per_restart"] + b["judged_images_per_prompt"]
    unit = {"optimisation_s": iters * it[str(r)], "selection_s": (iters + 1) * r * sel, "judging_s": images * judge_image_s}
    unit["total_s"] = sum(unit.values())
    unit["in_bare_unet_forward_backward_at_batch_1"] = unit["total_s"] / bare["1"]
    unit["how"] = (f"one prompt, its {r} restarts batched into one forward: {iters} iterations x iteration_s[{r}] + an upper bound of "
                   f"{iters + 1} x {r} fixed-batch selections (every iterate's projected prompt new) + {images} judged images x "
                   f"{b['judge_steps']} steps x 2 UNet forwards at the selection batch's per-row cost (VAE decode not counted)")
    passes = {"forward_backward": prompts * iters * r, "forward": prompts * ((iters + 1) * r * draws + images * b["judge_steps"] * 2)}
    ref = b["reference_iterations_per_prompt"]
    inv = it[str(b["inversion_batch_size"])]
    return {"unlearndiffatk_unit": unit,
            "protocol": {"prompts": prompts, "unet_passes": passes, "gpu_hours": prompts * unit["total_s"] / 3600},
            "reference_budget": {"iterations_per_prompt": ref, "unet_forward_backward_passes": prompts * ref,
                                 "gpu_hours": prompts * ref * it["1"] / 3600, "how": "prompts x 50 timesteps x 40 iterations x iteration_s[1]"},
            "inversion": {"step_s": inv, "over_bare_unet": inv / bare[str(b["inversion_batch_size"])],
                          "seed_s": b["inversion_steps"] * inv, "steps": b["inversion_steps"]},
            "iteration_over_bare_unet": {k: it[k] / bare[k] for k in it}}


# ------------------------------------------------------------------------------------------------------ a run
def run_piece(name: str, result: dict, archs: dict, settings: dict, device) -> str:
    """Measure one piece into ``result``; its status: done, or oom."""
    from benchmarks import gpu_rows

    p = parse_piece(name)
    if p["kind"] == "memory_plan":  # the rows `python benchmarks/memory_plan.py` prints
        result["memory_plan"] = [memory_plan(n, 1, keep) for n in MMDIT for keep in (False, True)]
        return "done"
    if p["kind"] == "detection":
        result["detection"] = gpu_rows.detection_row(settings["det_images"])
        return "done"
    arch = archs[p["arch"]]
    entry = result["archs"][p["arch"]]
    if p["kind"] == "repair":
        row = gpu_rows.repair_row(arch, p["batch"], p["checkpointing"], device, settings["steps"], settings["warmup"])
        if arch.name in MMDIT:
            row.update(memory_expectation(arch.name, p["batch"]))
            if "peak_gpu_gib" in row:
                row["measured_over_expected"] = row["peak_gpu_gib"] / row["expected_allocated_gib"]
        if "s_per_step" in row:  # the throughput the plan's pass count implies (to check its utilisation)
            per_step = repair_forwards(p["checkpointing"])[0]
            row["implied_tflops"] = per_step * p["batch"] * flops(arch)["denoiser_forward"] / row["s_per_step"] / 1e12
            row["implied_tflops_counts"] = f"{per_step} forwards of {flops(arch)['denoiser_forward'] / 1e12:.3g} TFLOP per sample per step"
        entry.setdefault("repair", {})[p["label"]] = row
    elif p["kind"] == "generation":
        from benchmarks.gpu_models import family_of

        row = gpu_rows.generation_row(arch, device, settings["gen_batch"][family_of(arch).denoiser], settings["gen_steps"])
        if "per_step_s" in row:  # denoiser FLOPs of a step over its measured seconds
            row["achieved_tflops"] = row["passes_per_step"] * row["batch"] * flops(arch)["denoiser_forward"] / row["per_step_s"] / 1e12
        entry["generation"] = row
    else:
        row = gpu_rows.attack_row(arch, device, settings["attack_repeats"])
        result["attacks"] = {**row, **({} if row.get("oom") else attack_costs(row))}
    return "oom" if row.get("oom") else "done"


def _device_info(device) -> dict:
    import diffusers
    import transformers

    info = {"device": "cpu", "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, device_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    return info


@cli_errors
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", help="The JSON file every figure goes to (rewritten after every piece).")
    p.add_argument("--smoke", action="store_true", help="Tiny configs on the CPU, 1 timed step, few denoising steps: checks the script.")
    p.add_argument("--only", nargs="+", metavar="PATTERN", help="Run only the pieces matching a pattern (fnmatch, e.g. 'repair:flux_dev:*').")
    p.add_argument("--skip", nargs="+", metavar="PATTERN", help="Leave out the pieces matching a pattern.")
    p.add_argument("--list", action="store_true", help="Print the selected pieces and their planned seconds on one H100, then exit.")
    p.add_argument("--budget_s", type=float, default=None,
                   help=f"Skip a piece that would end past this many seconds from the start (default {DEFAULT_BUDGET_S} on a GPU, none with --smoke).")
    p.add_argument("--resume", action="store_true", help="Keep the pieces an earlier run finished in --output (same mode) and run the rest.")
    args = p.parse_args(argv)
    check_number("--budget_s", args.budget_s, Range())  # finite (no range in OPTION_RANGES; > 0 is checked below)
    started = time.perf_counter()
    pieces = select(args.only, args.skip)
    mode = "smoke" if args.smoke else "gpu"
    settings, archs = SETTINGS[mode], SMOKE_ARCHS if args.smoke else ARCHS
    if args.list:
        planned = plan(pieces, ARCHS, SETTINGS["gpu"])
        for name in pieces:
            print(f"{name:28s} {planned['pieces'][name]:7.1f} s")
        print(f"{'total (with startup)':28s} {planned['total_s']:7.1f} s on one H100 (planned)")
        return planned
    if not args.output:
        raise UserError("--output is required (the JSON file the figures go to), unless --list")
    check_json_output("--output", args.output, has_keys("mode", "pieces", "plan"))  # never over a file this tool did not write
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise UserError("no CUDA GPU (torch.cuda.is_available() is False); use --smoke to check the script on a CPU")
    budget = args.budget_s if args.budget_s is not None else (None if args.smoke else DEFAULT_BUDGET_S)
    if budget is not None and budget <= 0:
        raise UserError(f"--budget_s must be > 0, got {args.budget_s:g}")
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # the libraries' warnings about random weights, for this run only
    try:
        return _run(Path(args.output), args, mode, settings, archs, device, pieces, budget, started)
    finally:
        logging.disable(quiet)


def _run(out: Path, args, mode: str, settings: dict, archs: dict, device, pieces: list[str], budget: float | None, started: float) -> dict:
    """The pieces in order, the JSON rewritten after each (see the module docstring)."""
    result = _start(out, args, mode, settings, device, pieces, archs)

    def save():
        from erase.utils.files import atomic_write_text

        result["wall_seconds"] = time.perf_counter() - started
        for name, entry in result["archs"].items():
            entry["erasure_estimate"] = erasure_estimate(archs[name], entry, result.get("device_memory_gib"))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")  # after every piece: a cut-short run keeps what it measured

    planned, spent = result["plan"]["pieces"], {"planned": 0.0, "measured": 0.0}
    save()
    for name in pieces:
        if result["pieces"].get(name, {}).get("status") in ("done", "oom"):
            continue  # --resume: finished before
        pace = min(max(spent["measured"] / spent["planned"], 0.5), 3.0) if spent["planned"] else 1.0
        left = None if budget is None else budget - (time.perf_counter() - started)
        if left is not None and planned[name] * pace > left:
            result["pieces"][name] = {"status": f"skipped: planned {planned[name] * pace:.0f} s (x{pace:.2f} pace), {left:.0f} s of the budget left",
                                      "planned_s": planned[name]}
            print(f"{name}: skipped (budget)", flush=True)
            save()
            continue
        t0 = time.perf_counter()
        try:
            status = run_piece(name, result, archs, settings, device)
        except Exception as e:  # one broken piece must not cost the others their GPU time
            status = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        seconds = time.perf_counter() - t0
        spent["planned"], spent["measured"] = spent["planned"] + planned[name], spent["measured"] + seconds
        result["pieces"][name] = {"status": status, "seconds": seconds, "planned_s": planned[name]}
        print(f"{name}: {status} in {seconds:.1f} s (planned {planned[name]:.1f} s)", flush=True)
        save()
    failed = [n for n, v in result["pieces"].items() if v["status"].startswith("failed")]
    print(f"figures: {out} ({time.perf_counter() - started:.0f} s)", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} piece(s) failed: {', '.join(failed)} (see 'pieces' in {out})")
    return result


def _start(out: Path, args, mode: str, settings: dict, device, pieces: list[str], archs: dict) -> dict:
    """A fresh result, or with ``--resume`` the earlier one of the same mode."""
    if args.resume and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("mode") != mode:
            raise UserError(f"--resume: {out} holds a {earlier.get('mode')!r} run, this is a {mode!r} run")
        earlier["command"] = earlier["command"] + " ; " + " ".join(sys.argv)
        earlier["plan"]["pieces"].update(plan(pieces, archs, settings)["pieces"])
        result = earlier
    else:
        result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv), "mode": mode,
                  "smoke": args.smoke, **_device_info(device), "settings": settings, "plan": plan(pieces, archs, settings),
                  "pieces": {}, "archs": {}}
    for n in sorted({parse_piece(p)["arch"] for p in pieces if parse_piece(p)["arch"]}):
        result["archs"].setdefault(n, {"family": archs[n].family, "hub_id": archs[n].hub_id, "resolution": archs[n].resolution,
                                       "flops_at_batch_1": flops(archs[n])})
    return result


if __name__ == "__main__":
    main()
