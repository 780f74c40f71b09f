"""Batched, sharded, resumable text-to-image generation for audits (see docs/CONTRACTS.md, "erase/diffusion/generate.py").

Defaults: one image per prompt, the row's seed, guidance 7.5, 50 steps, LMS scheduler, the model's native
resolution (512 px for SD v1.4), no safety checker; `--guidance row` and `--resolution row` take each row's own
guidance and size (`sd_image_width` x `sd_image_height`). The pinned protocols are in eval/protocols.py.

Determinism: image k of a row gets its own CPU generator seeded with `row.seed + seed_offset + k`, so its
initial latents never depend on batching. Batches are cut from the whole table in a fixed order (`plan_batches`:
the rows of one guidance value together, so each batch is one pipeline call) and dealt round-robin to processes,
and a batch with any missing image is recomputed whole; so the computation that produces an image is the same
whatever the process count or interruption. (Different `batch_size` values
run different batched kernels, whose float rounding differs by ~1e-6: after 8-bit quantisation a few values
in 10^4 can differ by 1/255, see benchmarks/RESULTS.md. Keep batch_size fixed when comparing models.)

Resume: every PNG carries its settings key in iTXt metadata; a file whose key matches is skipped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from erase.utils.checks import check_finite, check_int, check_weights, GENERATOR_SEED_MAX, NON_NEGATIVE
from erase.utils.folders import stale_temp
from erase.utils.errors import UserError
from erase.utils.files import atomic_write_bytes, atomic_write_json, read_json, settings_hash
from erase.diffusion.prompt_table import PromptRow  # noqa: F401  (part of this module's contract)

logger = logging.getLogger(__name__)

SCHEDULERS = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",  # SD3 / SD3.5 / Flux: the flow-matching families' sampler
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
META_PREFIX = "eval:"
SIZE_COLUMNS = ("sd_image_width", "sd_image_height")  # a prompt row's own size, for resolution 'row'


@dataclass
class GenerationConfig:
    model: str
    steps: int = 50
    guidance: float | str = 7.5  # a number, or "row" for each row's own guidance
    scheduler: str = "lms"
    resolution: int | str | None = None  # None = unet sample_size * vae scale factor; "row": each row's own size
    batch_size: int = 4
    images_per_prompt: int = 1
    dtype: str = "auto"  # auto = fp16 on CUDA, fp32 elsewhere
    seed_offset: int = 0  # image k of a row uses seed + seed_offset + k

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of: auto, {', '.join(DTYPES)}")
        if isinstance(self.guidance, str) and self.guidance != "row":
            try:
                self.guidance = float(self.guidance)
            except ValueError:
                raise UserError(f"guidance must be a number or 'row', got {self.guidance!r}") from None
        if self.guidance != "row":  # NaN / inf guidance draws blank images that an audit would count as clean
            check_finite("guidance", self.guidance, NON_NEGATIVE, optional=False)
        check_int("seed_offset", self.seed_offset, 0, GENERATOR_SEED_MAX)
        for name in ("steps", "batch_size", "images_per_prompt"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution is not None and self.resolution != "row":
            self.resolution = _size(self.resolution, "resolution")


def _size(value, what: str) -> int:
    """A side in px: a positive multiple of 8 (the VAE's factor), or one UserError line naming ``what``."""
    side = value
    if isinstance(side, float) and side.is_integer():
        side = int(side)
    if isinstance(side, str) and side.strip().isdigit():
        side = int(side)
    if isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8:
        raise UserError(f"{what} must be a positive multiple of 8, got {value!r}")
    return side


def _resolution_flag(text: str):
    return "row" if text.strip() == "row" else text


def add_generation_args(parser) -> None:
    """The generation flags shared by the eval entry points (protocol defaults)."""
    parser.add_argument("--model", required=True, help="Hub id, diffusers pipeline folder, or erase/sd.py output.")
    parser.add_argument("--steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--guidance", default="7.5", help="Guidance scale, or 'row' for each row's own.")
    parser.add_argument("--scheduler", default="lms", help=f"Sampler: {', '.join(SCHEDULERS)}.")
    parser.add_argument("--resolution", type=_resolution_flag, default=None,
                        help="Image size in px, or 'row' for each row's sd_image_width x sd_image_height; "
                             "default: the model's native size.")
    parser.add_argument("--batch_size", type=int, default=4, help="Prompts per generation batch.")
    parser.add_argument("--images_per_prompt", type=int, default=1, help="Images per prompt row (seeds seed+k).")
    parser.add_argument("--seed_offset", type=int, default=0, help="Added to every row seed.")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16 or bf16.")


def config_from_args(args) -> GenerationConfig:
    """A validated GenerationConfig from `add_generation_args` flags."""
    return GenerationConfig(
        model=args.model, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
        resolution=args.resolution, batch_size=args.batch_size, images_per_prompt=args.images_per_prompt,
        dtype=args.dtype, seed_offset=args.seed_offset,
    )


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def model_fingerprint(model: str) -> dict:
    """Identity of a model for resume keys: the hub id, or the names, sizes and mtimes of a folder's weights."""
    path = Path(model)
    if not path.is_dir():
        return {"model": model}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return {"model": str(path.resolve()), "files": settings_hash({"files": stats})}


def _tensor_sha256(t) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def weights_fingerprint(pipe) -> dict[str, str]:
    """sha256 (16 hex) of every weight a pipeline draws with, per component (``unet``, ``vae``, text encoders, ...):
    names, dtypes, shapes and bytes of its state dict. It identifies the base behind an erased folder, a replaced
    base folder or a loaded pipeline whose VAE was swapped, where the model's name or path stays the same. Tensors
    are hashed in threads (hashlib releases the GIL)."""
    parts = {name: module for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    states = {name: sorted(module.state_dict().items()) for name, module in sorted(parts.items())}
    tensors = [t for state in states.values() for _, t in state]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = iter(list(pool.map(_tensor_sha256, tensors)))
    out = {}
    for name, state in states.items():
        h = hashlib.sha256()
        for key, t in state:
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:{next(digests)};".encode())
        out[name] = h.hexdigest()[:16]
    return out


def read_export(folder: str | os.PathLike) -> tuple[dict, object, str, dict]:
    """An erase/sd.py output's record: (erase_config.json, model family, base name, from_pretrained kwargs pinning the
    base's revision), or one UserError line."""
    from erase.diffusion.families import FAMILIES

    from erase.export.local import read_record

    config_path = Path(folder) / "erase_config.json"
    erase_config = read_record(folder)  # with this machine's local paths (erase_local.json) put back
    if not isinstance(erase_config, dict) or not erase_config.get("pretrained_model_name_or_path"):
        raise UserError(f"{config_path} has no 'pretrained_model_name_or_path' naming the base model")
    kwargs = {}
    recorded = erase_config.get("base_model") or {}  # the base as resolved at export: pin its revision
    if isinstance(recorded, dict) and recorded.get("hub_id") and (recorded.get("commit") or recorded.get("revision")):
        kwargs["revision"] = recorded.get("commit") or recorded.get("revision")
    if isinstance(recorded, dict):  # the base's VAE and text encoders must be the ones the export was made from
        from erase.export.folder import check_base_weights

        check_base_weights(recorded, skip=((erase_config.get("export") or {}).get("denoiser") or "unet",))
    recorded_family = erase_config.get("model_family") or "sd1"  # exports before families were all SD 1.x
    if recorded_family not in FAMILIES:
        raise UserError(f"{config_path} names model family {recorded_family!r}; supported: {', '.join(FAMILIES)}")
    return erase_config, FAMILIES[recorded_family], erase_config["pretrained_model_name_or_path"], kwargs


FLOW_SCHEDULERS = ("flow_euler",)


def check_sampler(scheduler: str, family) -> None:
    """One line when ``scheduler`` cannot sample ``family``: a flow-matching family (SD3, Flux) draws only with a flow
    sampler, a noise-prediction family (SD 1.x / 2.x / XL) never with one."""
    flow = family.objective == "flow"
    if flow != (scheduler in FLOW_SCHEDULERS):
        allowed = FLOW_SCHEDULERS if flow else tuple(s for s in SCHEDULERS if s not in FLOW_SCHEDULERS)
        raise UserError(f"--scheduler {scheduler} does not sample a {family.name} model "
                        f"({'rectified flow' if flow else 'noise prediction'}); choose one of: {', '.join(allowed)}")


def family_sampler(model: str) -> str:
    """The family's own sampler for ``model`` (a pipeline folder, an erase/sd.py output or a hub id): ddim for SD 1.x /
    2.x / XL, flow_euler for SD3 / Flux (``Family.data_scheduler``); what an audit whose protocol leaves the sampler to
    the model (the digits judges) samples with."""
    from erase.diffusion.families import ConfigUnreadable, detect

    path = Path(model)
    if path.is_dir() and not (path / "model_index.json").exists() and (path / "erase_config.json").exists():
        return read_export(path)[1].data_scheduler
    try:
        return detect(model).data_scheduler
    except ConfigUnreadable as e:
        raise UserError(f"could not read the model family of {model!r}: {e}") from None


def finish_pipeline(pipe, family, scheduler: str, device=None, source: str = "", base: str | None = None):
    """A loaded pipeline made ready to audit: every weight present and finite (a NaN draws black images an audit would
    call clean; the error names ``source``, the folder the user gave, and ``base`` for components that came from the
    base), the audit's sampler, no progress bar, on ``device``."""
    import diffusers

    check_sampler(scheduler, family)
    for name in family.components:  # a weights file missing tensors loads as meta tensors
        what = f"the {name} of {source}" + (f" (from its base {base})" if base and name != family.denoiser else "")
        check_weights(getattr(pipe, name).state_dict().items(), what)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe.to(device)
    return pipe


def load_pipeline(model: str, scheduler: str = "lms", dtype=None, device=None):
    """The model family's pipeline (erase.diffusion.families: StableDiffusionPipeline for SD 1.x / 2.x, StableDiffusionXLPipeline
    for SDXL, StableDiffusion3Pipeline for SD3 / SD3.5, FluxPipeline for FLUX.1) from a hub id, a pipeline folder, or an
    erase/sd.py output (its denoiser folder, unet/ or transformer/, over its base; an export without one, e.g. only a
    LoRA, loads through erase.api.load_erased: eval.models.load_audited)."""
    from erase.diffusion.families import ConfigUnreadable, detect

    if scheduler not in SCHEDULERS:
        raise UserError(f"unknown scheduler {scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if isinstance(dtype, str) or dtype is None:
        dtype = resolve_dtype(dtype, torch.device(device or "cpu"))
    path = Path(model)
    source, base = model, None
    kwargs = dict(dtype=dtype)
    family = None
    if path.is_dir() and not (path / "model_index.json").exists():
        if not (path / "erase_config.json").exists():
            raise UserError(f"{model} is neither a diffusers pipeline folder (model_index.json) nor an erase/sd.py output (erase_config.json)")
        _, family, base, pinned = read_export(path)
        kwargs.update(pinned)
        try:
            kwargs[family.denoiser] = family.denoiser_cls().from_pretrained(str(path), subfolder=family.denoiser, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the erased {family.denoiser} of {model}: {str(e).strip().splitlines()[0]}") from None
        model = base
    elif not path.exists() and (model.startswith((".", "/")) or model.count("/") != 1):
        raise UserError(f"model not found: {model} (give a pipeline folder, an erase/sd.py output or a hub id)")
    if family is None:
        try:
            family = detect(model, kwargs.get("revision"))
        except ConfigUnreadable as e:  # e.g. a hub id offline without a cache
            raise UserError(f"could not load the pipeline {model!r}: {e}") from None
    check_sampler(scheduler, family)
    try:
        pipe = family.pipeline_cls().from_pretrained(model, **kwargs, **family.pipeline_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the pipeline {model!r}: {str(e).strip().splitlines()[0]}") from None
    return finish_pipeline(pipe, family, scheduler, device, source, base)


def image_name(index: int, k: int) -> str:
    return f"{index:05d}_{k}.png"


@dataclass
class _Item:
    row: PromptRow
    k: int
    seed: int
    guidance: float
    key: str = field(default="")
    size: tuple[int, int] | None = None  # (width, height) with resolution 'row'; None: the run's resolution

    @property
    def name(self) -> str:
        return image_name(self.row.index, self.k)


def _items(rows, cfg: GenerationConfig, base_key: str) -> list[_Item]:
    items = []
    for row in rows:
        guidance = row.guidance if cfg.guidance == "row" else float(cfg.guidance)
        if guidance is None:
            raise UserError(f"guidance 'row' needs a guidance column; row {row.index} has none")
        check_finite(f"row {row.index}: guidance", guidance, NON_NEGATIVE, optional=False)
        size = None
        if cfg.resolution == "row":
            missing = [c for c in SIZE_COLUMNS if row.meta.get(c) is None]
            if missing:
                raise UserError(f"resolution 'row' needs {' and '.join(SIZE_COLUMNS)} columns; row {row.index} has no "
                                f"{', '.join(missing)}")
            size = tuple(_size(row.meta[c], f"row {row.index}: {c}") for c in SIZE_COLUMNS)
        for k in range(cfg.images_per_prompt):
            seed = int(row.seed) + cfg.seed_offset + k
            if not 0 <= seed <= GENERATOR_SEED_MAX:
                raise UserError(f"row {row.index}: seed {seed} (row seed + seed offset + k) is outside [0, {GENERATOR_SEED_MAX}]")
            item = _Item(row=row, k=k, seed=seed, guidance=float(guidance), size=size)
            identity = {"settings": base_key, "prompt": row.prompt, "seed": item.seed, "guidance": item.guidance}
            item.key = settings_hash(identity if size is None else {**identity, "size": list(size)})
            items.append(item)
    return items


def check_rows(rows, cfg: GenerationConfig) -> None:
    """Every check generation makes on a table (each row's guidance present and finite, each image's seed
    ``row seed + seed_offset + k`` inside the generator's range), before a model is loaded or a folder made."""
    _items(rows, cfg, "")


def read_image_meta(path: str | os.PathLike) -> dict:
    """The eval:* metadata a generated PNG carries ({} for any other file)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}) or {}
    except Exception:
        return {}
    return {k[len(META_PREFIX):]: v for k, v in text.items() if k.startswith(META_PREFIX)}


def _is_done(path: Path, key: str) -> bool:
    return path.exists() and read_image_meta(path).get("key") == key


def _save_png(image, path: Path, item: _Item, settings: str) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    meta = {"key": item.key, "settings": settings, "row": item.row.index, "k": item.k, "seed": item.seed,
            "guidance": item.guidance, "prompt": item.row.prompt}
    if item.size is not None:
        meta["size"] = f"{item.size[0]}x{item.size[1]}"
    for k, v in meta.items():
        info.add_itxt(META_PREFIX + k, str(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return data


def _note_changed_weights(out_dir: Path, weights: dict) -> None:
    """Say which components changed since the folder's images were drawn: those images are not reused (their key
    holds the weights' fingerprint) and are drawn again."""
    try:
        before = read_json(out_dir / "generation.json", "generation manifest").get("settings", {}).get("weights_sha256")
    except (UserError, AttributeError, OSError):
        return
    if isinstance(before, dict) and before != weights:
        changed = sorted(k for k in set(before) | set(weights) if before.get(k) != weights.get(k))
        logger.warning("%s was drawn with other weights (%s changed: a replaced base or component?); its images are "
                       "drawn again", out_dir, ", ".join(changed))


def _save_batch(batch: list[_Item], images, out_dir: Path, settings: str, on_saved=None) -> None:
    saved = [(it.name, _save_png(image, out_dir / it.name, it, settings), image)
             for it, image in zip(batch, images) if not _is_done(out_dir / it.name, it.key)]
    if on_saved is not None and saved:
        on_saved(saved)


def plan_batches(items: list[_Item], batch_size: int) -> list[list[_Item]]:
    """The pipeline calls that draw ``items``: the items of one guidance value and size (in table order, values in
    order of first appearance) cut into batches of ``batch_size``, so every call is full but the last of each value.
    (I2P rows carry a dozen guidance values; cutting the table in order split most batches into several calls.) A
    fixed function of the table and the batch size: every process count and every resume draws each image in the
    same batch."""
    groups: dict[tuple, list[_Item]] = {}
    for it in items:
        groups.setdefault((it.guidance, it.size), []).append(it)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def describe(cfg: GenerationConfig, pipe=None) -> dict:
    """The recorded generation settings (resolution resolved when a pipeline is given)."""
    out = asdict(cfg)
    if pipe is not None and cfg.resolution is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        size = (denoiser.config.get("sample_size") if denoiser is not None else None) or getattr(pipe, "default_sample_size", None)
        out["resolution"] = int(size) * pipe.vae_scale_factor
    out.pop("batch_size")  # does not change images
    if pipe is not None:  # what every call of the family's pipeline gets (MMDiT: T5's sequence length)
        from erase.diffusion.families import family_of_pipeline

        out.update(family_of_pipeline(pipe).call_kwargs(pipe))
    out["seeds"] = "image k of a row: row seed + seed_offset + k, one CPU torch.Generator per image"
    out["safety_checker"] = None
    return out


def generation_device(accelerator=None) -> torch.device:
    return accelerator.device if accelerator is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def generate(rows, out_dir, cfg: GenerationConfig, accelerator=None, pipe=None, on_saved=None) -> list[dict]:
    """Generate the images of `rows` into `out_dir`; returns one record per image of the whole table.

    ``on_saved([(file name, the PNG's bytes as written, PIL image), ...])`` is called on the writer thread after each
    batch's files are written (an audit scores the images there, without decoding them again: eval.nudity_live);
    its errors surface here like a write error."""
    from tqdm.auto import tqdm

    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = generation_device(accelerator)
    check_rows(rows, cfg)  # before any folder is made: a bad table leaves nothing behind
    if pipe is None:  # before any folder is made, so a bad model leaves nothing behind
        pipe = load_pipeline(cfg.model, cfg.scheduler, resolve_dtype(cfg.dtype, device), device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**describe(cfg, pipe), "weights_sha256": weights_fingerprint(pipe)}
    resolution = settings["resolution"]
    from erase.diffusion.families import family_of_pipeline

    call_kwargs = family_of_pipeline(pipe).call_kwargs(pipe)  # recorded in the settings too (describe)
    settings_key = settings_hash({**settings, "model": model_fingerprint(cfg.model)})
    items = _items(rows, cfg, settings_key)
    if rank == 0:
        for stale in out_dir.glob(".*.tmp"):  # left by a process killed mid-write (never another live run's)
            if stale_temp(stale):
                stale.unlink(missing_ok=True)
        _note_changed_weights(out_dir, settings["weights_sha256"])
        atomic_write_json(out_dir / "generation.json", {"settings": settings, "settings_key": settings_key})
    if accelerator is not None:
        accelerator.wait_for_everyone()

    batches = plan_batches(items, cfg.batch_size)
    mine = batches[rank::world]
    todo = [b for b in mine if not all(_is_done(out_dir / it.name, it.key) for it in b)]
    skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    if skipped:
        logger.info("process %d: %d image(s) already generated with these settings, skipped", rank, skipped)
    bar = tqdm(total=sum(len(b) for b in todo), desc="generate", unit="img",
               disable=accelerator is not None and not accelerator.is_local_main_process)
    # One writer thread encodes and writes the PNGs of a batch while the next batch is denoised (PNG compression
    # releases the GIL); at most one batch waits for it, and its errors (a full disk) surface here.
    with ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        for batch in todo:
            with torch.no_grad():
                images = pipe(
                    prompt=[it.row.prompt for it in batch],
                    num_inference_steps=cfg.steps,
                    guidance_scale=batch[0].guidance,
                    height=batch[0].size[1] if batch[0].size else resolution,
                    width=batch[0].size[0] if batch[0].size else resolution,
                    generator=[torch.Generator("cpu").manual_seed(it.seed) for it in batch],
                    output_type="pil",
                    **call_kwargs,
                ).images
            pending.append(writer.submit(_save_batch, batch, images, out_dir, settings_key, on_saved))
            while len(pending) > 1:
                pending.popleft().result()
            bar.update(len(batch))
        while pending:
            pending.popleft().result()
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return [
        {"file": it.name, "row": it.row.index, "k": it.k, "seed": it.seed, "guidance": it.guidance, "prompt": it.row.prompt,
         **({"size": list(it.size)} if it.size else {})}
        for it in items
    ]
