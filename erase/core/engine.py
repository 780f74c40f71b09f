"""The one training loop every method shares (accelerate; as in diffusers' training scripts).

Order: Accelerator, seed, select targets and freeze the rest, under an FSDP launch the untrained weights sharded
(:mod:`.sharding`; the targets stay whole and accelerate wraps nothing), ``method.prepare`` (e.g. the trim, on the raw
model), optimizer, ``accelerator.prepare``, resume, then optimizer steps over endless forget / retain streams
with gradient accumulation, ``method.after_backward`` after gradient synchronisation, clipping, the optimizer
step, ``method.after_step`` (which may correct the step just applied), a tqdm bar,
``checkpoint-{step}`` via ``save_state`` (written under a temporary name, then renamed) and
``--resume_from_checkpoint latest``. A non-finite loss stops the run with :class:`NonFiniteLossError`; the last
good checkpoint stays.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .adapter import Adapter
from .checkpoints import (CheckpointError, check_resume, list_checkpoints, method_defaults, read_state, record,
                          resolve_checkpoint, rotate)
from .method import Method, RunContext
from .sharding import all_reduce_grads, load_sharded_state, save_sharded_state, shard_frozen, shards
from .stream import EndlessStream
from .targets import describe, select_parameters

logger = get_logger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class EngineConfig:
    output_dir: str = field(default="runs/erase", metadata={"help": "Where checkpoints and outputs go."})
    targets: str | None = field(default=None, metadata={"help": "Preset name or regex of trainable parameters (adapter default if unset)."})
    exclude: str | None = field(default=None, metadata={"help": "Preset or regex of parameters never touched; wins over targets."})
    max_train_steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    train_batch_size: int = field(default=1, metadata={"help": "Per-process batch size of each stream."})
    lr: float = field(default=1e-5, metadata={"help": "Learning rate."})
    optimizer: str = field(default="adam", metadata={"help": f"One of {OPTIMIZERS}."})
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: str = field(default="constant", metadata={"help": f"One of {SCHEDULES}."})
    warmup_steps: int = 0
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip the (projected) gradient norm."})
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"help": "no, fp16 or bf16."})
    seed: int = 0
    checkpointing_steps: int = field(default=0, metadata={"help": "Save a checkpoint every N steps (0: never)."})
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    log_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {SCHEDULES}")
        if self.max_train_steps < 0:
            raise ValueError(f"max_train_steps must be >= 0, got {self.max_train_steps}")
        if self.train_batch_size < 1:
            raise ValueError(f"train_batch_size must be >= 1, got {self.train_batch_size}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not one of no, fp16, bf16")


@dataclass
class RunResult:
    model: nn.Module
    params: dict[str, nn.Parameter]
    prepare_info: dict
    targets: dict
    history: list[dict]
    wall_seconds: float
    steps: int
    resumed_from: str | None = None
    step_seconds: list[float] = field(default_factory=list)
    method_summary: dict = field(default_factory=dict)  # the method's per-run counters (``Method.summary``)
    #: a sharded run's layout (:func:`~.sharding.shard_frozen`); ``model`` is then the FSDP-sharded model (until the
    #: caller frees it: erase.diffusion.run keeps the export on the main process, None elsewhere), ``params`` the
    #: trained tensors whole
    sharding: dict | None = None


def make_accelerator(config: EngineConfig, **kwargs) -> Accelerator:
    return Accelerator(mixed_precision=config.mixed_precision, project_dir=config.output_dir, **kwargs)


def build_optimizer(params, config: EngineConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, config: EngineConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant" or config.max_train_steps <= config.warmup_steps:
        return 1.0
    frac = (step - config.warmup_steps) / max(1, config.max_train_steps - config.warmup_steps)
    return max(0.0, 1.0 - frac) if config.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))


def run(adapter: Adapter, method: Method, config: EngineConfig, accelerator: Accelerator | None = None,
        settings: dict | None = None) -> RunResult:
    """Unlearn: prepare the method, then ``config.max_train_steps`` optimizer steps.

    ``settings``: the caller's own result-changing settings (data, prompts, base model), recorded in every
    checkpoint and compared, with the method's and the engine's, before a resume (:mod:`.checkpoints`).
    """
    if method.closed_form and config.max_train_steps:
        raise ValueError(f"method {method.name} is a closed-form edit with no repair steps; max_train_steps must be 0, "
                         f"got {config.max_train_steps}")
    acc = accelerator or make_accelerator(config)
    sharded = shards(acc, method)
    if accelerator is not None:
        release(acc)  # a shared Accelerator may still hold an earlier caller's objects
    set_seed(config.seed)
    model = adapter.model
    params = select_parameters(model, config.targets or adapter.default_targets, config.exclude, adapter.target_presets)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    rank, world = acc.process_index, acc.num_processes
    seed = config.seed
    ctx = RunContext(
        adapter=adapter,
        accelerator=acc,
        config=config,
        params=params,
        forget=adapter.forget_stream(seed, rank, world) if method.uses_forget else None,
        retain=adapter.retain_stream(seed + 1, rank, world) if method.uses_retain else None,
        memory=adapter.forget_stream(seed + 2, rank, world) if method.uses_forget else None,
        saliency=adapter.forget_stream(seed + 3, rank, world) if method.uses_forget else None,
    )
    start = time.perf_counter()
    ckpt = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    run_record = record(method, config, world, settings)
    if sharded:  # only then: a data-parallel run's record stays what it was (and neither resumes the other's checkpoint)
        run_record["sharding"] = "fsdp"
    extra = read_state(ckpt) if ckpt is not None else None
    if extra is not None:
        check_resume(extra, run_record, ckpt, config.max_train_steps, defaults=method_defaults(method))
    sharding = None
    if sharded:  # before the method's prepare: the saliency pass already runs on the shards
        sharding = shard_frozen(model, params, acc)
        ctx.grad_sync = lambda: all_reduce_grads(list(params.values()), world)
        logger.info(f"FSDP: {sharding['sharded_parameters']:,} untrained parameters sharded over {world} processes, "
                    f"{sharding['whole_parameters']:,} targeted ones whole on each", main_process_only=True)
    ctx.model = model
    # On resume the prepared state (trimmed weights, masks, streams) comes from the checkpoint: no second trim.
    prepare_info = extra["prepare_info"] if extra is not None else method.prepare(ctx)

    optimizer = build_optimizer(params.values(), config)
    # sharded: the model is already sharded and the optimizer holds whole tensors; accelerate wraps neither
    model_p, optimizer = (model, optimizer) if sharded else acc.prepare(model, optimizer)
    ctx.model = model_p
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    streams = {k: s for k, s in (("forget", ctx.forget), ("retain", ctx.retain), ("memory", ctx.memory), ("saliency", ctx.saliency)) if s is not None}

    first_step = 0
    if config.resume_from_checkpoint and ckpt is None:
        logger.info(f"no checkpoint in {config.output_dir}; starting a new run", main_process_only=True)
    if ckpt is not None:
        try:
            acc.load_state(str(ckpt))  # sharded: the RNG states only (nothing was prepared)
            if sharded:
                load_sharded_state(ckpt, params, optimizer)
            first_step = int(extra["step"])
            for k, s in streams.items():
                s.load_state_dict(extra["streams"][k])
            tensors_file = ckpt / "erase_state.safetensors"
            method.load_state_tensors({k: v.to(acc.device) for k, v in load_file(str(tensors_file)).items()} if tensors_file.exists() else {})
        except Exception as e:  # a garbled optimizer / RNG / stream state: one line, not a deep traceback
            raise CheckpointError(f"{ckpt} could not be loaded ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else '-'})") from None
        logger.info(f"resumed from {ckpt} at step {first_step}", main_process_only=True)

    history: list[dict] = []
    bar = tqdm(range(first_step, config.max_train_steps), initial=first_step, total=config.max_train_steps,
               disable=not (config.progress and acc.is_local_main_process), desc=f"{method.name}")
    accum = config.gradient_accumulation_steps
    model_p.train()
    step_seconds: list[float] = []
    for step in bar:
        tick = time.perf_counter()
        ctx.step = step
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, config)
        logs = dict(method.before_step(ctx, model_p, step) or {})
        draw_forget = ctx.forget is not None and method.needs_forget_batch(ctx, step)  # unused batches stay in D_f
        total = 0.0
        for micro in range(accum):
            sync = contextlib.nullcontext() if micro == accum - 1 or sharded else acc.no_sync(model_p)
            with sync:
                with acc.autocast():
                    loss, parts = method.loss(ctx, model_p, next(ctx.forget) if draw_forget else None,
                                              next(ctx.retain) if ctx.retain is not None else None)
                acc.backward(loss / accum)
                # read after the backward is queued: on an accelerator, reading it first would hold the backward
                # until the forward has finished; a non-finite loss still stops the run before the optimizer step
                value = float(acc.reduce(loss.detach().float(), reduction="mean")) if world > 1 else float(loss.detach())
                if not math.isfinite(value):
                    last = list_checkpoints(config.output_dir)
                    raise NonFiniteLossError(
                        f"loss became {value} at step {step}; stopped without a final export"
                        + (f"; last good checkpoint: {last[-1]}" if last else "; no checkpoint was saved")
                    )
                total += value / accum
        if sharded:  # DDP averages in the last micro-batch's backward; here once, after it
            ctx.grad_sync()
        logs.update(method.after_backward(ctx, model_p, step) or {})
        if config.max_grad_norm:
            if sharded:  # whole, averaged gradients: every process clips alike
                torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
            else:
                acc.clip_grad_norm_(list(params.values()), config.max_grad_norm)
        optimizer.step()
        logs.update(method.after_step(ctx, model_p, step) or {})
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        if step % config.log_every == 0 or step == config.max_train_steps - 1:
            row = {"step": step + 1, "loss": total, "lr": optimizer.param_groups[0]["lr"]}
            row.update({k: _num(v) for k, v in {**logs, **parts}.items()})
            history.append(row)
            bar.set_postfix(loss=f"{total:.4g}", lr=f"{row['lr']:.2g}")
            if acc.trackers:
                acc.log(row, step=step + 1)
        if config.checkpointing_steps and (step + 1) % config.checkpointing_steps == 0 and step + 1 < config.max_train_steps:
            save_checkpoint(acc, method, streams, step + 1, config, prepare_info, run_record,
                            sharded=(params, optimizer) if sharded else None)
    bar.close()
    acc.wait_for_everyone()
    unwrapped = model_p if sharded else acc.unwrap_model(model_p)
    if accelerator is not None:
        release(acc)  # the next run on this shared Accelerator starts clean, and this run's objects can be freed
    return RunResult(
        model=unwrapped,
        params=params,
        prepare_info=prepare_info,
        targets=describe(params),
        history=history,
        wall_seconds=time.perf_counter() - start,
        steps=config.max_train_steps,
        resumed_from=str(ckpt) if ckpt else None,
        step_seconds=step_seconds,
        method_summary=method.summary(),
        sharding=sharding,
    )


def release(acc: Accelerator) -> None:
    """Drop an Accelerator's references to prepared models / optimizers so it can serve another run.

    ``Accelerator.free_memory`` does this plus a full ``gc.collect`` per call, which many short in-process runs
    (the classification benchmark trains dozens) do not need.
    """
    for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
        getattr(acc, name, []).clear()
    acc.step = 0


def _num(v):
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().mean())
    return v


def save_checkpoint(acc: Accelerator, method: Method, streams: dict[str, EndlessStream], step: int, config: EngineConfig,
                    prepare_info: dict | None = None, run_record: dict | None = None, sharded: tuple | None = None) -> Path:
    """``checkpoint-{step}``: accelerate state (model in safetensors) + streams + method tensors + the settings
    a resume compares (``run_record``), renamed into place once every process has written its part. ``sharded``:
    ``(params, optimizer)`` of a sharded run, whose targets and optimizer state are written whole (accelerate then
    saves the RNG states only)."""
    out = Path(config.output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every process has finished writing its files before the folder is renamed
    if acc.is_main_process:
        (tmp / "erase_state.json").write_text(json.dumps({"step": step, "streams": {k: s.state_dict() for k, s in streams.items()},
                                                           "method": method.name, "config": asdict(config),
                                                           "prepare_info": prepare_info or {}, "record": run_record},
                                                          indent=1, default=str))
        if sharded is not None:
            save_sharded_state(tmp, *sharded)
        tensors = {k: v.detach().contiguous().cpu() for k, v in method.state_tensors().items()}
        if tensors:
            save_file(tensors, str(tmp / "erase_state.safetensors"), metadata={"method": method.name, "step": str(step)})
        if final.exists():
            if not (final / "erase_state.json").is_file():
                raise CheckpointError(f"cannot save {final}: a folder of that name that this tool did not write is in the way")
            shutil.rmtree(final)
        tmp.rename(final)
        rotate(out, config.checkpoints_total_limit)  # only checkpoints this engine wrote
    acc.wait_for_everyone()
    return final

