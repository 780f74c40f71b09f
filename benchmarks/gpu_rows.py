"""The measurements behind benchmarks/gpu_figures.py, one function per kind of row (each returns a JSON-able dict):

* :func:`repair_row`: a default erasure's repair through the run's own stages, on random weights of a real
  architecture: seconds per step and the trim's seconds, peak GPU memory, what ran in which dtype;
* :func:`generation_row`: audit / data generation throughput with the family's pipeline;
* :func:`attack_row`: the passes the prompt attacks need on the SD v1.4 architecture (fp32, as the attacks load it);
* :func:`detection_row`: NudeNet, the audits' detector.

A GPU out-of-memory error is recorded in the row (``oom``), never raised.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.gpu_models import build_generation_pipeline, build_parts, build_text_encoders, build_tokenizers, family_of, sampler_of

GiB = 2**30


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> dict:
    if torch.device(device).type != "cuda":
        return {}
    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / GiB, "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB}


def _timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- repair
def erase_config(arch, batch: int, checkpointing: bool, steps: int, mixed_precision: str, output_dir: str):
    """The run's own config of a default ``--concept nudity`` erasure of ``arch`` (validated: Scissorhands' diffusion
    defaults, the redirect forget term, the distill retain term, the family's ``xattn`` targets)."""
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.validate import apply_family

    config = EraseConfig.from_options(arch.hub_id, "nudity", output_dir=output_dir, train_batch_size=batch, max_train_steps=steps,
                                      mixed_precision=mixed_precision, gradient_checkpointing=checkpointing, log_every=10**9).validate()
    config.family = family_of(arch)  # what resolve_family reads from the hub folder, here from the arch
    apply_family(config, config.family)
    return config


def synthetic_data(config, arch, data_dir: Path):
    """Stage 2's :class:`erase.diffusion.data.EraseData` without generating: ``num_forget_images`` forget images of the
    concept's generation prompts (as ``generate_split`` names them) with random VAE posteriors of the arch's latent shape."""
    from erase.diffusion.data import EraseData, ImageSet
    from erase.diffusion.generate import image_name

    concept = config.concept_set.concepts[0]
    n, prompts = config.data.num_forget_images, concept.generation_prompts
    forget = ImageSet("forget", [data_dir / "forget" / image_name(i, 0) for i in range(n)], [prompts[i % len(prompts)] for i in range(n)],
                      [config.train.seed + i for i in range(n)])
    g = torch.Generator().manual_seed(1)
    shape = (n, arch.vae["latent_channels"], arch.latent, arch.latent)
    latents = {"forget": (torch.randn(shape, generator=g), torch.full(shape, 0.05))}
    return EraseData(data_dir, forget, None, latents, arch.resolution, [concept.name])


@contextmanager
def own_accelerate_state():
    """The row's own accelerate state, reset before and after it: the process-wide ``AcceleratorState`` keeps the mixed
    precision it was first created with and refuses another (a bf16 row after a caller's fp32 run, or the reverse), so
    each row starts and leaves it empty (as tests/eval_fixtures.py does around an in-process audit)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()

    reset()
    try:
        yield
    finally:
        reset()


def repair_row(arch, batch: int, checkpointing: bool, device, steps: int = 3, warmup: int = 1, mixed_precision: str = "bf16") -> dict:
    """See :func:`_repair_row`; in a fresh accelerate state."""
    with own_accelerate_state():
        return _repair_row(arch, batch, checkpointing, device, steps, warmup, mixed_precision)


def _repair_row(arch, batch: int, checkpointing: bool, device, steps: int, warmup: int, mixed_precision: str) -> dict:
    """A default erasure's stages 1-5 (erase/diffusion/run.py ``_stages``, with the run's functions) on random weights:
    the denoiser built in fp32 on the device and placed by ``load.place`` (untrained weights in the mixed-precision
    dtype, the targets fp32 masters), the prompt tables encoded by the family's text stack and the stack and VAE moved to
    the CPU as the run does, ``adapter.build_adapter`` (FrozenBase, the family's objective and conditioner), then
    ``erase.core.run``: the trim (saliency over the method's default batches, top-k, re-initialisation) and
    ``warmup + steps`` repair steps. Timed: the trim and each step (CUDA-synchronised stamps around ``prepare`` and
    ``before_step``); peak memory of trim + repair, and of the placement before it.

    The text encoders are built at their real widths with one block each (T5-XXL alone is 4.7 B parameters): the repair
    never calls them, and the run moves them to the CPU before it; only their widths and sequence lengths reach it."""
    from erase.core import build_method, run
    from erase.core.engine import make_accelerator, release
    from erase.diffusion.adapter import build_adapter
    from erase.diffusion.conditioning import encode, prompt_tables
    from erase.diffusion.load import place, select_targets
    from erase.diffusion.record import engine_config
    from erase.diffusion.run import check_selection

    out_dir = Path(tempfile.mkdtemp(prefix="gpu_figures_"))
    config = erase_config(arch, batch, checkpointing, warmup + steps, mixed_precision, str(out_dir))
    engine = dataclasses.replace(engine_config(config), progress=False)
    accelerator = make_accelerator(engine)
    method_options = dict(config.method_options)
    row = {"batch": batch, "gradient_checkpointing": checkpointing, "resolution": arch.resolution, "mixed_precision": mixed_precision,
           "method": config.method, "method_options": method_options, "targets": config.objective.targets,
           "retain_loss": config.objective.retain_loss, "text_encoders": "real widths, 1 block each (never called by the repair)"}
    free(device)
    phase, stamps = "build", []
    try:
        parts = build_parts(arch, device, torch.float32, text_layers=1)
        family = parts.family
        targeted = select_targets(config, parts.denoiser, family)
        check_selection(config, targeted)
        method = build_method(config.method, "diffusion", **config.method_options)
        row["method_config"] = dataclasses.asdict(method.config)  # every option, defaults resolved (saliency batches, ...)
        placement = place(parts, accelerator, arch.resolution, targeted)
        row.update({"load_" + k: v for k, v in peak_gib(device).items()})
        data = synthetic_data(config, arch, out_dir / "data")
        tables = prompt_tables(config.concept_set, data)
        embeddings = encode(tables, parts.text, placement.device, distill=config.objective.retain_loss != "data")
        parts.text.to("cpu")  # the run frees the GPU of the text stack and the VAE before the repair
        parts.vae.to("cpu")
        if checkpointing:
            parts.denoiser.enable_gradient_checkpointing()
        adapter = build_adapter(config, parts, placement, data, tables, embeddings, method, targeted)
        row.update(denoiser_parameters=sum(p.numel() for p in parts.denoiser.parameters()),
                   targeted_parameters=sum(p.numel() for p in targeted.values()), parameter_dtypes=_dtype_counts(parts.denoiser),
                   targeted_dtypes=_dtype_counts_of(targeted.values()), prompt_rows=int(sum(t.shape[0] for t in _tables(embeddings))),
                   conditioning_tokens=int(embeddings.forget.shape[1]), objective=adapter.objective.describe())
        free(device)
        phase = "repair"
        _instrument(method, stamps, device)
        run(adapter, method, engine, accelerator=accelerator)
        sync(device)
        stamps.append(("end", time.perf_counter()))
    except torch.OutOfMemoryError as e:
        row.update(oom=True, oom_in=phase, error=str(e).strip().splitlines()[0][:300])
    finally:
        release(accelerator)
        shutil.rmtree(out_dir, ignore_errors=True)  # nothing is written there (no checkpoints, no data): the config's folder
    row.update(peak_gib(device))
    if not row.get("oom"):
        times = dict(stamps[:2])
        row["prepare_s"] = times["prepare_end"] - times["prepare_start"]
        step_stamps = [t for name, t in stamps if name in ("step", "end")]
        diffs = [b - a for a, b in zip(step_stamps, step_stamps[1:])]
        row.update(step_seconds=diffs, steps_timed=len(diffs[warmup:]), s_per_step=statistics.median(diffs[warmup:]))
    del stamps
    parts = adapter = method = targeted = placement = embeddings = None  # noqa: F841  (free the GPU before the next row)
    free(device)
    return row


def _instrument(method, stamps: list, device) -> None:
    """CUDA-synchronised time stamps around the method's trim and at the start of every step."""
    prepare, before = method.prepare, method.before_step

    def timed_prepare(ctx):
        sync(device)
        stamps.append(("prepare_start", time.perf_counter()))
        info = prepare(ctx)
        sync(device)
        stamps.append(("prepare_end", time.perf_counter()))
        return info

    def timed_before(ctx, model, step):
        sync(device)
        stamps.append(("step", time.perf_counter()))
        return before(ctx, model, step)

    method.prepare, method.before_step = timed_prepare, timed_before


def _dtype_counts_of(params) -> dict:
    out: dict[str, int] = {}
    for p in params:
        key = str(p.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + p.numel()
    return out


def _dtype_counts(module) -> dict:
    return _dtype_counts_of(module.parameters())


def _tables(embeddings):
    return [t for t in (embeddings.forget, embeddings.retain, embeddings.anchor, embeddings.uncond, embeddings.distill) if t is not None]


# ------------------------------------------------------------------------------------------------ generation
def generation_settings(arch) -> dict:
    """What an audit generates with: the I2P protocols' 50 LMS steps at guidance 7.5 (eval.i2p's defaults) for the UNet
    families; the family pipeline's own default steps and the family's default guidance on flow-matching Euler for SD3 /
    Flux. ``data_steps``: a run's data generation (``--num_inference_steps``' default)."""
    from erase.diffusion.config import DataConfig

    family = family_of(arch)
    if family.denoiser == "unet":
        from eval.i2p import UNPINNED_DEFAULTS

        steps, guidance = int(UNPINNED_DEFAULTS["steps"]), float(UNPINNED_DEFAULTS["guidance"])
    else:
        steps = inspect.signature(family.pipeline_cls().__call__).parameters["num_inference_steps"].default
        guidance = float(family.default_guidance)
    return {"sampler": sampler_of(arch), "steps": int(steps), "guidance": guidance, "data_steps": int(DataConfig().num_inference_steps),
            # Flux-dev's guidance is an embedding (one pass per step); the others run classifier-free guidance (two)
            "passes_per_step": 1 if family.name == "flux" else 2}


def generation_row(arch, device, batch: int, steps: tuple[int, int]) -> dict:
    """Seconds of two pipeline calls of ``batch`` images at ``steps[0]`` and ``steps[1]`` denoising steps after a 1-step
    warm-up, and the line through them: ``seconds(n) = fixed + n * per_step`` (fixed: prompt encoding and VAE decoding),
    which gives images/s at the audit's and at the data generation's step counts. dtype: fp16 for the UNet families (the
    audits' ``--dtype auto`` on CUDA), bf16 for SD3 / Flux (their released dtype), fp32 on a CPU."""
    settings = generation_settings(arch)
    family = family_of(arch)
    cuda = torch.device(device).type == "cuda"
    dtype = (torch.float16 if family.denoiser == "unet" else torch.bfloat16) if cuda else torch.float32
    row = {"batch": batch, "resolution": arch.resolution, "dtype": str(dtype).removeprefix("torch."), **settings}
    free(device)
    try:
        pipe = build_generation_pipeline(arch, device, dtype)
        prompts = ["a photo of a person on a beach"] * batch

        def call(n):
            with torch.no_grad():
                pipe(prompt=prompts, num_inference_steps=n, guidance_scale=settings["guidance"], height=arch.resolution,
                     width=arch.resolution, generator=[torch.Generator().manual_seed(i) for i in range(batch)], output_type="pil")

        row["warmup_s"] = _timed(lambda: call(1), device)
        seconds = [_timed(lambda n=n: call(n), device) for n in steps]
    except torch.OutOfMemoryError as e:
        row.update(oom=True, error=str(e).strip().splitlines()[0][:300], **peak_gib(device))
        pipe = None
        free(device)
        return row
    row.update(peak_gib(device))
    pipe = None  # noqa: F841
    free(device)
    row.update(fit_line(steps, seconds, batch, sorted({settings["steps"], settings["data_steps"]})))
    row["images_per_s"] = row["images_per_s_at"][str(settings["steps"])]
    return row


def fit_line(steps: tuple[int, int], seconds: list[float], batch: int, at: list[int]) -> dict:
    """The line through (steps, seconds); when the longer call was not the slower one (timing noise on a loaded CPU) the
    per-step time is bounded by the longer call alone (fixed part 0). Images/s and seconds per image at ``at`` steps."""
    (a, b), (ta, tb) = steps, seconds
    per_step = (tb - ta) / (b - a)
    fit = "line through the two calls"
    if per_step <= 0:
        per_step, fit = tb / b, "upper bound: the longer call's seconds / its steps"
    fixed = tb - b * per_step
    return {"steps_timed": list(steps), "seconds": list(seconds), "fit": fit, "per_step_s": per_step, "fixed_s": fixed,
            "seconds_per_image_at": {str(n): (fixed + n * per_step) / batch for n in at},
            "images_per_s_at": {str(n): batch / (fixed + n * per_step) for n in at}}


# --------------------------------------------------------------------------------------------------- attacks
#: the attacks' budgets the costs are stated for: the unlearndiffatk-nudity protocol's (eval/protocols.py: 142 prompts,
#: 5 tokens, 40 iterations, 4 restarts, 50 LMS steps), eval/attack/unlearndiffatk.py's fixed selection batch (8 draws)
#: and its judged images (the kept prompt and two controls on the attacked model, the controls on the base; the pre
#: check on both models and the base's target image: 5 per restart + 3 per prompt), inversion's batch (4) and the
#: 2000 steps issue 21 moves it to; the reference UnlearnDiffAtk code's 50 timesteps x 40 iterations per prompt.
ATTACK_BUDGET = {"loss_eval_draws": 8, "judged_images_per_restart": 5, "judged_images_per_prompt": 3, "inversion_batch_size": 4,
                 "inversion_steps": 2000, "reference_iterations_per_prompt": 50 * 40}


def attack_budget() -> dict:
    """:data:`ATTACK_BUDGET` with the unlearndiffatk-nudity protocol's own (eval/protocols.py) and the batch sizes the
    passes are timed at: 1 (today's one restart at a time), the restarts batched, inversion's batch."""
    from eval.protocols import PROTOCOLS

    protocol = PROTOCOLS["unlearndiffatk-nudity"]
    budget = dict(ATTACK_BUDGET, prompts=protocol.table_rows, judge_steps=protocol.steps, **protocol.attack)
    return {**budget, "batch_sizes": sorted({1, budget["restarts"], budget["inversion_batch_size"]})}


def attack_row(arch, device, repeats: int = 5) -> dict:
    """The passes one unlearndiffatk unit and one inversion step need on ``arch`` (SD v1.4), in fp32 as
    ``eval.attack.context.load_attacked`` loads the models, each timed bare (median of ``repeats`` after a warm-up):

    * ``unet_forward_backward_s[b]``: the UNet forward and backward to its text conditioning at batch b (weights frozen);
    * ``text_forward_backward_s[b]``: the text encoder forward and backward to its token embeddings;
    * ``iteration_s[b]``: both chained (token embeddings -> text encoder -> UNet -> loss -> backward to the embeddings):
      one unlearndiffatk iteration of b restarts batched into one forward, or one inversion step at batch b;
    * ``selection_forward_s``: one text encoder forward and one UNet forward at the fixed selection batch (no grad).

    The attacks' own code (eval/attack/) is not called: these are the passes it cannot do without, so a unit of the
    attack can be held against them (issue 21: <= 1.5x)."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    budget = attack_budget()
    draws = budget["loss_eval_draws"]
    free(device)
    family = family_of(arch)
    torch.manual_seed(0)
    with torch.device(device):
        unet = family.denoiser_cls()(**arch.denoiser).eval().requires_grad_(False)
        tokenizer = build_tokenizers(arch)[0]
        enc = build_text_encoders(arch, [tokenizer])[0].requires_grad_(False)
    sched = DDPMScheduler.from_config(arch.scheduler)
    width = arch.text[0]["hidden_size"]
    g = torch.Generator().manual_seed(0)
    shape = (arch.vae["latent_channels"], arch.latent, arch.latent)

    def inputs(b):
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        noise, x0 = torch.randn((b, *shape), generator=g), torch.randn((b, *shape), generator=g)
        ids = torch.randint(0, len(tokenizer), (b, 77), generator=g)
        return sched.add_noise(x0, noise, t).to(device), t.to(device), noise.to(device), ids.to(device)

    def text(ids, grad: bool):
        if not grad:
            return enc(ids)[0]
        delta = torch.zeros(*ids.shape, width, device=device, requires_grad=True)  # the token embeddings' gradient
        handle = enc.get_input_embeddings().register_forward_hook(lambda m, i, out: out + delta)
        try:
            return enc(ids)[0]
        finally:
            handle.remove()

    def unet_fb(b):
        zt, t, noise, _ = inputs(b)
        cond = torch.randn(b, 77, width, device=device, requires_grad=True)
        return lambda: F.mse_loss(unet(zt, t, cond).sample, noise).backward()

    def text_fb(b):
        ids = inputs(b)[3]
        return lambda: text(ids, True).square().mean().backward()

    def iteration(b):
        zt, t, noise, ids = inputs(b)
        return lambda: F.mse_loss(unet(zt, t, text(ids, True)).sample, noise).backward()

    def selection():
        zt, t, _, ids = inputs(draws)

        def go():
            with torch.no_grad():
                unet(zt, t, text(ids[:1], False).expand(draws, -1, -1))
        return go

    def median(make):
        fn = make()
        fn()  # warm-up
        return statistics.median(_timed(fn, device) for _ in range(repeats))

    try:
        sizes = budget["batch_sizes"]
        row = {"dtype": "float32", "resolution": arch.resolution, "repeats": repeats, "budget": budget,
               "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
               "unet_parameters": sum(p.numel() for p in unet.parameters()), "text_parameters": sum(p.numel() for p in enc.parameters()),
               "unet_forward_backward_s": {str(b): median(lambda b=b: unet_fb(b)) for b in sizes},
               "text_forward_backward_s": {str(b): median(lambda b=b: text_fb(b)) for b in sizes},
               "iteration_s": {str(b): median(lambda b=b: iteration(b)) for b in sizes},
               "selection_forward_s": median(selection)}
    except torch.OutOfMemoryError as e:
        row = {"oom": True, "error": str(e).strip().splitlines()[0][:300]}
    row.update(peak_gib(device))
    unet = enc = None  # noqa: F841
    free(device)
    return row


# ------------------------------------------------------------------------------------------------- detection
def detection_row(images: int, batch: int = 16, size: int = 512) -> dict:
    """NudeNet (eval.nudity.NudityDetector, the audits' detector) on ``images`` random images, ``batch`` per run."""
    import numpy as np

    from eval.nudity import NudityDetector

    detector = NudityDetector()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    detector.detect(pixels[:2])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(pixels), batch):
        detector.detect(pixels[i : i + batch])
    seconds = time.perf_counter() - t0
    return {"images": images, "batch": batch, "image_px": size, "seconds": seconds, "images_per_s": images / seconds,
            "providers": detector.session.get_providers(), **detector.settings()}
