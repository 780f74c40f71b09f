"""An erasure run: a validated :class:`erase.diffusion.config.EraseConfig` through its stages.

    preflight ─ check folders and the user's images (no model)            erase.diffusion.run.preflight
        │
    1 load ──── family parts of the base: text stack, VAE, UNet, scheduler  erase.diffusion.load
    2 data ──── forget / retain images (generated or given) -> latents      erase.diffusion.data
    3 conditioning ─ prompt tables -> text-encoder outputs                  erase.diffusion.conditioning
    4 adapter ─ UNet + objective (forget term, retain term)                 erase.diffusion.adapter
    5 engine ── the method's prepare (trim) and the repair loop             erase.core.engine.run
    6 record and export ─ erase_config.json, unet/, delta, formats          erase.diffusion.record, erase.export

:func:`erase` runs them all under the output folder's lock and returns an :class:`EraseResult`; each stage is a
function of its own that a caller may run alone (:func:`prepare_data` runs stages 1-2 once, so several erasures can
share the images: ``erase(config, data=...)``).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env, set_seed

from erase.core import NonFiniteLossError, ShardingError, TopKError, build_method, run
from erase.core.checkpoints import CheckpointError, read_state
from erase.core.closed_form import ClosedFormError
from erase.core.engine import make_accelerator, RunResult
from erase.core.registry import get_method_class
from erase.core.sharding import release_meshes, sharding_of, shards
from erase.diffusion import data as data_stage
from erase.diffusion.adapter import build_adapter
from erase.diffusion.conditioning import encode, prompt_tables
from erase.diffusion.config import EraseConfig
from erase.diffusion.load import Components, load_components, place, resolve_family, select_targets
from erase.diffusion.record import build_record, engine_config, run_settings
from erase.diffusion.robust import build_robust, robust_settings
from erase.diffusion.validate import export_spec
from erase.utils.checks import check_free_space, check_weights
from erase.utils.errors import UserError
from erase.utils.folders import MARKER_NAME, check_output_dir, hold_output_dir, mark_ours

logger = get_logger(__name__)


@dataclass
class EraseResult:
    """What a run gives back: the erased UNet, its record (``erase_config.json``; ``None`` on other processes than the
    main one), the output folder and the engine's own result (history, timings)."""

    unet: torch.nn.Module | None  # the erased denoiser (a UNet, or an SD3 / Flux transformer; FSDP: the export on the main
    # process, None on the others)
    record: dict | None
    output_dir: Path
    engine: RunResult


def preflight(config: EraseConfig, probe: bool = False) -> dict:
    """Every check that needs the file system but no model, on every process before any work (``--check`` runs only
    this): output and data folders (erase.utils.folders), user image folders and their captions (erase.utils.images),
    and an explicit checkpoint; ``probe`` (``--check``) also what taking the folder's lock would say. Returns the user
    image sets."""
    base, out = config.model.pretrained_model_name_or_path, config.output  # a local folder or a hub id (its cache)
    folder = check_output_dir(out.output_dir, base=base, overwrite=out.overwrite, probe=probe, by="erase/sd.py")
    d = config.data
    if d.data_dir and not Path(d.data_dir).expanduser().resolve().is_relative_to(folder):
        check_output_dir(d.data_dir, flag="--data_dir", base=base, overwrite=out.overwrite)
    found = {}
    if d.forget_images:
        found["forget"] = data_stage.user_forget_images(d.forget_images, [c.name for c in config.concept_set.concepts])
    if d.retain_images and get_method_class(config.method, "diffusion").uses_retain:
        found["retain"] = data_stage.folder_split("retain", d.retain_images)
    t = config.train
    if t.resume_from_checkpoint and t.resume_from_checkpoint != "latest":
        try:
            read_state(Path(t.resume_from_checkpoint))
        except CheckpointError as e:
            raise UserError(str(e)) from None
    return found


def check_selection(config: EraseConfig, targeted: dict) -> None:
    """A top-k / mask ratio that selects no weight of the targets silently disables the method: refuse it."""
    n = sum(p.numel() for p in targeted.values())
    fields = get_method_class(config.method, "diffusion").config_cls.__dataclass_fields__
    for name in ("topk", "mask_ratio"):
        if name in fields:
            k = config.method_options.get(name, fields[name].default)
            if round(n * k / 100) < 1:
                raise UserError(f"--{name} {k:g} % of the {n:,} targeted weights selects none ({n * k / 100:.3g} rounds to 0); "
                                f"raise --{name} or target more weights")


def erase(config: EraseConfig, components: Components | None = None, data: data_stage.EraseData | None = None) -> EraseResult:
    """Run every stage of ``config`` (validated here if it was not) under the output folder's lock.

    ``components``: parts already loaded (:func:`erase.diffusion.load.components_from_pipeline`, or a function of the
    family that returns them); ``data``: stage 2's output of an earlier :func:`prepare_data` (its images are used as they
    are, its resolution wins)."""
    with _claimed(config) as user_images:
        return _stages(config, components, data, user_images)


def prepare_data(config: EraseConfig, components: Components | None = None) -> data_stage.EraseData:
    """Stages 1-2 alone, under the output folder's lock: the forget / retain images and their latents (in
    ``--data_dir``, or ``output_dir/data``), to hand to several :func:`erase` calls."""
    with _claimed(config) as user_images:
        accelerator = make_accelerator(engine_config(config))
        set_seed(config.train.seed)
        family = resolve_family(config)
        parts = components(family) if callable(components) else components or load_components(config)
        placement = place(parts, accelerator, config.data.resolution)
        return data_stage.prepare_data(config, parts, placement, accelerator, user_images)


@contextmanager
def _claimed(config: EraseConfig):
    """Validate (if not yet), preflight on every process, then hold the output folder (main process) for the block;
    a ``--data_dir`` outside it is created and marked as ours. Yields the user image sets."""
    if getattr(config, "concept_set", None) is None:
        config.validate()
    user_images = preflight(config)
    out = config.output
    # One run per output folder: the main process (rank 0 of any launcher) holds its lock until the run ends.
    with hold_output_dir(out.output_dir, base=config.model.pretrained_model_name_or_path, overwrite=out.overwrite, by="erase/sd.py") as claim:
        d, folder, new, marked = config.data, None, False, False
        if claim is not None and d.data_dir and not Path(d.data_dir).expanduser().resolve().is_relative_to(claim.path):
            folder = Path(d.data_dir).expanduser()
            new, marked = not folder.exists(), not (folder / MARKER_NAME).exists()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                mark_ours(folder, by="erase/sd.py")
            except OSError as e:
                raise UserError(f"--data_dir {d.data_dir} is not writable ({e.strerror})") from None
        try:
            yield user_images
        finally:  # a data folder the run marked and left without data (bad input found later) goes back as it was
            if marked and {p.name for p in folder.iterdir()} == {MARKER_NAME}:
                (folder / MARKER_NAME).unlink()
                if new:
                    folder.rmdir()


def _stages(config: EraseConfig, components, data, user_images) -> EraseResult:
    engine = engine_config(config)
    accelerator = make_accelerator(engine)
    out = _run_stages(config, engine, accelerator, components, data, user_images)
    accelerator.wait_for_everyone()
    if out.engine.sharding is not None:
        # The shards' device mesh (held by the sharded modules and by DTensor's caches) keeps its process groups, and
        # their gloo threads, alive past end_training: left to the interpreter's shutdown, a process that had finished
        # its work aborted once in CI. Drop the shards (the main process keeps the export) so that ending the groups
        # below joins their threads.
        out.unet = out.engine.model = out.unet if accelerator.is_main_process else None
        release_meshes()
    accelerator.end_training()
    return out


def _run_stages(config: EraseConfig, engine, accelerator, components, data, user_images) -> EraseResult:
    try:
        sharding_of(accelerator)  # before any image is drawn: DeepSpeed / Megatron and fp16 under FSDP are refused here
    except ShardingError as e:
        raise UserError(str(e)) from None
    if parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        # transformers would load the text encoders as empty (meta) tensors on every process but the first, for accelerate
        # to fill in when it wraps them; this run never hands them to accelerate: every process loads them whole
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        logger.info("fsdp_cpu_ram_efficient_loading is ignored: each process loads the base's parts whole", main_process_only=True)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        for noisy in ("diffusers", "transformers"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    set_seed(config.train.seed)
    start = time.perf_counter()
    out_dir = Path(config.output.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    # 1. load: only the UNet trains; the text stack and VAE are frozen and cast to the mixed-precision dtype
    family = resolve_family(config)
    parts = components(family) if callable(components) else components or load_components(config)
    targeted = select_targets(config, parts.denoiser, family)  # fail before any data work if the targets match nothing
    check_selection(config, targeted)
    try:  # the method's own config checks, before any data work
        method = build_method(config.method, "diffusion", **config.method_options)
    except ValueError as e:
        raise UserError(f"--method {config.method}: {e}") from None
    spec = export_spec(config)
    if accelerator.is_main_process:
        _check_room(out_dir, parts, spec, config.output.export_pipeline)
    sharded = shards(accelerator, method)
    # sharded: the denoiser stays on the CPU (in the weight dtype) until the engine shards it onto the devices, unless the
    # data stage draws images with it
    placement = place(parts, accelerator, data.resolution if data is not None else config.data.resolution, targeted,
                      denoiser_device="cpu" if sharded else None)

    # 2. data, 3. conditioning
    if data is not None:
        data = data.for_concepts([c.name for c in config.concept_set.concepts], data_stage.needs_retain_images(config))
    else:
        if sharded and data_stage.draws_images(config):
            parts.denoiser.to(placement.device)  # generation runs the whole denoiser on each process
        data = data_stage.prepare_data(config, parts, placement, accelerator, user_images)
    tables = prompt_tables(config.concept_set, data)
    embeddings = encode(tables, parts.text, placement.device, distill=config.objective.retain_loss != "data")
    if placement.device.type != "cpu" and not getattr(config, "robust", False):  # the repair needs neither: free the GPU
        parts.text.to("cpu")
        parts.vae.to("cpu")
        torch.cuda.empty_cache()
    if config.train.gradient_checkpointing:
        parts.denoiser.enable_gradient_checkpointing()

    # 4. adapter, 5. engine: the method's prepare (trim), the repair, checkpoint-{step}, resume
    adapter = build_adapter(config, parts, placement, data, tables, embeddings, method, targeted)
    method = build_robust(config, parts, placement, data, tables, adapter, method)  # --robust: the adversary joins (issue 17)
    base_tensors = {n: p.detach().to("cpu", copy=True) for n, p in targeted.items()}  # for the delta
    logger.info(f"{config.method} on {len(targeted)} tensors ({sum(p.numel() for p in targeted.values()):,} parameters) of the "
                f"{'UNet' if family.denoiser == 'unet' else family.denoiser}; "
                f"{len(adapter.forget_set)} forget / {len(adapter.retain_set) if adapter.retain_set else 0} retain images at "
                f"{placement.resolution}px, retain term {adapter.retain_mode}")
    try:
        settings = run_settings(config, data, tables)
        if config.robustness.robust:  # only then: a plain run's resume record stays what it was
            settings.update(robust_settings(config))
        result = run(adapter, method, engine, accelerator=accelerator, settings=settings)
    except NonFiniteLossError as e:
        raise UserError(f"{e} (lower --lr / --lam or set --forget_bound)") from None
    except (FloatingPointError, TopKError, CheckpointError, ClosedFormError, ShardingError) as e:  # ClosedFormError: uce / speed
        raise UserError(str(e)) from None

    # 6. record and export (main process): finite weights only, built beside the folder and swapped in whole
    record, erased = None, result.model
    if accelerator.is_main_process:
        record = build_record(config, family, method, engine, result, adapter, data, accelerator, time.perf_counter() - start)
        # the untrained weights ran in half precision, or in shards: export the base's own with the trained tensors put in
        if placement.weight_dtype != torch.float32 or result.sharding is not None:
            erased = _with_base_weights(config, family, result.params)
        _export(config, family, erased, base_tensors, record, spec, out_dir)
    # a sharded run's model is in shards: the main process gives back the exported one (the base with the trained tensors)
    return EraseResult(erased if result.sharding is not None else result.model, record, out_dir, result)


def _check_room(out_dir: Path, parts: Components, spec, export_pipeline: bool) -> None:
    """Room for the export, before any work."""
    frozen = [parts.vae, *parts.text.encoders]
    need = sum(t.numel() * t.element_size() for m in [parts.denoiser] + (frozen if export_pipeline else []) for t in m.state_dict().values())
    if "single_file" in spec.formats:  # the whole pipeline again, at <= 4 bytes a weight
        need += sum(t.numel() * 4 for m in [parts.denoiser, *frozen] for t in m.state_dict().values())
    check_free_space(out_dir, int(need * 1.2) + (16 << 20), "the export")


def _with_base_weights(config: EraseConfig, family, trained: dict):
    """The erased denoiser with every untrained weight as the base stores it: the base reloaded (on the CPU) with the
    ``trained`` tensors (name -> tensor, whole) put in, so an export under mixed precision or from a sharded run is the
    base outside the targets, bit for bit."""
    m = config.model
    fresh = family.denoiser_cls().from_pretrained(m.pretrained_model_name_or_path, subfolder=family.denoiser, revision=m.revision,
                                                  variant=m.variant)
    dtypes = {n: t.dtype for n, t in fresh.state_dict().items()}
    fresh.load_state_dict({n: t.detach().to("cpu", dtypes[n]) for n, t in trained.items()}, strict=False)
    return fresh


def _export(config: EraseConfig, family, unet, base_tensors: dict, record: dict, spec, out_dir: Path) -> None:
    from erase.export.folder import export

    check_weights(unet.state_dict().items(), f"the erased {'UNet' if family.denoiser == 'unet' else family.denoiser}", "; nothing was exported (lower --lr or --lam, or set "
                  "--max_grad_norm / --forget_bound)")
    pipeline = None
    if config.output.export_pipeline:
        m = config.model
        extra = {"add_watermarker": False} if family.pooled else {}  # SD 1.x / 2.x keep the base's safety checker, if any
        pipeline = family.pipeline_cls().from_pretrained(m.pretrained_model_name_or_path, revision=m.revision, variant=m.variant,
                                                         **{family.denoiser: unet}, **extra)
    try:
        delta = export(out_dir, unet, base_tensors, record, pipeline=pipeline, spec=spec)
    except OSError as e:
        raise UserError(f"could not write the export into {out_dir} ({e.strerror or e}); nothing was exported, "
                        "the folder is as it was") from None
    logger.info(f"exported to {out_dir}: {delta['tensors_changed']} tensors changed, {delta['entries_changed']:,} entries")
