"""The training loop the world models share (the digits and shapes models, UNet and SD3 kinds) and its saved state.

A world model trains for minutes (digits) to most of an hour (shapes, and each of its retrain references) on a CPU.
:class:`TrainingState` keeps the state of the training beside the model's folder, in ``.<folder>.partial/``: after
the autoencoder phase, then every ``CHECKPOINT_SECONDS`` of the denoiser phase (the weights, the EMA copies, the
optimiser and scheduler, the data generator and torch's global generator, the autoencoder and its latent scale), one
safetensors file and a JSON record, each written to a temporary name and renamed, the older state removed only after
the newer one is complete. A training that is interrupted (a killed process, a full disk, a reboot) and asked for
again resumes from the last state and ends **bit-identical** to an uninterrupted one on the same machine and thread
count (tests/test_train_resume.py); the state is removed once the model folder is in place. A state of other
settings (another fingerprint) or a damaged one is discarded, and so is any state when the training is forced
(``--force``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from erase.utils.files import atomic_write_json

logger = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 120.0  # denoiser phase: seconds between saved states (the default shapes model: weights, EMA and
# two Adam moments of its 10.8 M trained parameters, about 0.17 GB per state)
STATE_FORMAT = 1
RECORD = "state.json"


class TrainingState:
    """The saved state of one model's training (see the module docstring); ``fresh`` discards any earlier state."""

    def __init__(self, output_dir: str | Path, fingerprint: str, fresh: bool = False):
        output_dir = Path(output_dir)
        self.dir = output_dir.parent / f".{output_dir.name}.partial"
        self.fingerprint = fingerprint
        self.last_save = time.monotonic()
        self.carry: dict = {"tensors": {}, "meta": {}}  # saved with every state (the autoencoder, its latent scale)
        if fresh:
            self.clear()

    def load(self) -> dict | None:
        """The last complete state of this fingerprint ({"phase", "step", "meta", "tensors"}), or None."""
        record = self.dir / RECORD
        if not record.is_file():
            return None
        try:
            r = json.loads(record.read_text())
            ok = (isinstance(r, dict) and r.get("format") == STATE_FORMAT and r.get("fingerprint") == self.fingerprint
                  and r.get("phase") in ("autoencoder", "denoiser") and isinstance(r.get("step"), int)
                  and isinstance(r.get("meta"), dict) and isinstance(r["meta"].get("latent"), dict)
                  and (self.dir / str(r.get("file"))).is_file())
        except (OSError, json.JSONDecodeError):
            ok = False
        if not ok:
            logger.warning("discarding the saved training state in %s (another model's settings, or unreadable)", self.dir)
            self.clear()
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(self.dir / r["file"])
        except Exception as e:  # a cut or damaged file (safetensors raises its own error type): start over
            logger.warning("discarding the saved training state in %s (%s: %s)", self.dir, type(e).__name__, e)
            self.clear()
            return None
        logger.info("resuming the training from its state after %s step %d (%s)", r["phase"], r["step"], self.dir)
        return {"phase": r["phase"], "step": int(r["step"]), "meta": r["meta"], "tensors": tensors}

    def due(self) -> bool:
        return time.monotonic() - self.last_save >= CHECKPOINT_SECONDS

    def save(self, phase: str, step: int, tensors: dict, meta: dict) -> None:
        """Write the state after ``step`` of ``phase`` (with :attr:`carry`); a failed write keeps the previous state and
        the training goes on (the state only saves time)."""
        from safetensors.torch import save_file

        name = f"state-{phase}-{step}.safetensors"
        tmp = self.dir / f".{name}.tmp-{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().clone() for k, v in {**self.carry["tensors"], **tensors}.items()}, tmp)
            os.replace(tmp, self.dir / name)
            atomic_write_json(self.dir / RECORD, {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "phase": phase,
                                                  "step": step, "file": name, "meta": {**self.carry["meta"], **meta}})
        except OSError as e:
            tmp.unlink(missing_ok=True)
            logger.warning("could not save the training state to %s (%s); training goes on from memory", self.dir, e)
            return
        for old in self.dir.glob("state-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
        self.last_save = time.monotonic()

    def hold_autoencoder(self, vae, latent: dict) -> None:
        """Carry the frozen autoencoder and its phase's figures in every later state."""
        self.carry = {"tensors": {f"vae.{k}": v for k, v in vae.state_dict().items()}, "meta": {"latent": latent}}

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def sd_scheduler_config() -> dict:
    """SD v1.4's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def generators_state(gen: torch.Generator) -> dict:
    """The data generator's and torch's global generator's states, as tensors."""
    return {"rng.data": gen.get_state(), "rng.torch": torch.get_rng_state()}


def restore_generators(tensors: dict, gen: torch.Generator) -> None:
    gen.set_state(tensors["rng.data"])
    torch.set_rng_state(tensors["rng.torch"])


def prefixed(tensors: dict, prefix: str) -> dict:
    """The entries of ``tensors`` under ``prefix``, without it (a module's state dict)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_tensors(opt) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def _load_optimizer(opt, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, v in prefixed(tensors, "opt.").items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in groups]
    opt.load_state_dict({"state": state, "param_groups": groups})


def autoencoder_state(state: TrainingState | None, vae, gen: torch.Generator, latent: dict) -> None:
    """After the autoencoder phase and its latent scale: what every later state carries, and the phase's own state.
    ``latent``: JSON-able figures of the phase (scaling and shift factors, reconstruction error)."""
    if state is None:
        return
    state.hold_autoencoder(vae, latent)
    state.save("autoencoder", 0, generators_state(gen), {})


def resume_autoencoder(state: TrainingState, record: dict, vae, gen: torch.Generator) -> dict:
    """Load a saved autoencoder into ``vae`` (frozen, its latent scale in its config) and, when the state is the
    autoencoder phase's own, the generators as they were after it; returns the phase's figures."""
    vae.load_state_dict(prefixed(record["tensors"], "vae."))
    vae.eval().requires_grad_(False)
    latent = record["meta"]["latent"]
    shift = latent.get("shift_factor")
    vae.register_to_config(scaling_factor=latent["scaling_factor"], **({"shift_factor": shift} if shift is not None else {}))
    if record["phase"] == "autoencoder":
        restore_generators(record["tensors"], gen)
    state.hold_autoencoder(vae, latent)
    return dict(latent)


def train_autoencoder_steps(vae, n_images: int, batch, cfg, gen: torch.Generator, bar, schedule=None) -> None:
    """Phase 1 of a world model: ``cfg.vae_steps`` steps of reconstruction + ``cfg.vae_kl_weight`` x KL on batches
    ``batch(idx)`` of ``cfg.vae_batch_size`` images drawn from ``gen`` (AdamW ``cfg.vae_lr``; ``schedule(opt)`` an
    optional learning-rate scheduler); the autoencoder is left frozen."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = schedule(opt) if schedule is not None else None
    for _ in range(cfg.vae_steps):
        x = batch(torch.randint(0, n_images, (cfg.vae_batch_size,), generator=gen))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        bar.update(1)
        bar.set_postfix(phase="vae", loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)


def _ema_update(ema: dict, module: torch.nn.Module, decay: float):
    with torch.no_grad():
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                ema[k].mul_(decay).add_(v, alpha=1 - decay)
            else:
                ema[k].copy_(v)


def noise_loss(unet, text_encoder, ids: torch.Tensor, gen: torch.Generator):
    """``loss(z, rows)`` of :func:`train_denoiser` for a UNet: SD's epsilon objective (Ho et al. 2020, eq. 14) on one
    batch of scaled latents ``z`` under the prompt rows ``rows`` of ``ids``; noise, then timesteps, drawn from ``gen``
    in that order, on SD v1.4's noise schedule."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in sd_scheduler_config().items()
                                   if k not in ("set_alpha_to_one", "steps_offset")})

    def loss(z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        cond = text_encoder(ids[rows])[0]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z),), generator=gen)
        return F.mse_loss(unet(noise_sched.add_noise(z, noise, t), t, cond).sample, noise)

    return loss


def train_denoiser(unet, text_encoder, ids, latents, draw_rows, empty_row: int, cfg, gen, schedule, bar, loss_fn=None,
                   state: TrainingState | None = None, record: dict | None = None) -> float:
    """Phase 2 of a world model (the digits model here, eval.shapes too): the denoiser and the text encoder(s) trained
    together on scaled latents, ``cfg.cond_dropout`` of the prompts replaced by the empty one (row ``empty_row``), an
    EMA of every module loaded at the end. ``latents`` = (mean, std, scaling factor) of the images (the mean already
    shifted for a VAE with a shift factor); ``draw_rows(idx)`` gives the prompt rows of the drawn images (it may draw
    from ``gen``); ``schedule(opt)`` the learning-rate scheduler; ``text_encoder`` one module or a list of them;
    ``loss_fn(z, rows)`` the loss of a batch (default: :func:`noise_loss` over the first encoder's ``ids[rows]``).
    Every draw comes from ``gen`` in a fixed order. ``state``: saved every ``CHECKPOINT_SECONDS``; ``record``: a saved
    state of this phase to continue from. Returns the last loss."""
    mean, std, scaling = latents
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    if loss_fn is None:
        loss_fn = noise_loss(unet, encoders[0], ids, gen)
    modules = [unet] + encoders
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = schedule(opt)
    emas = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]
    first = 0
    if record is not None and record["phase"] == "denoiser":
        t = record["tensors"]
        for i, (m, ema) in enumerate(zip(modules, emas)):
            m.load_state_dict(prefixed(t, f"model.{i}."))
            ema.update(prefixed(t, f"ema.{i}."))
        _load_optimizer(opt, t, record["meta"]["optimizer"])
        sched.load_state_dict(record["meta"]["scheduler"])
        restore_generators(t, gen)
        first = record["step"] + 1
        bar.update(first)
    for m in modules:
        m.train()
    loss = torch.zeros(())
    for step in range(first, cfg.unet_steps):
        idx = torch.randint(0, len(mean), (cfg.batch_size,), generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling
        rows = draw_rows(idx)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        rows = torch.where(drop, torch.full_like(rows, empty_row), rows)
        loss = loss_fn(z, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        for ema, m in zip(emas, modules):
            _ema_update(ema, m, decay)
        bar.update(1)
        bar.set_postfix(phase="denoiser", loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if state is not None and step < cfg.unet_steps - 1 and state.due():
            opt_tensors, groups = _optimizer_tensors(opt)
            tensors = {**{f"model.{i}.{k}": v for i, m in enumerate(modules) for k, v in m.state_dict().items()},
                       **{f"ema.{i}.{k}": v for i, ema in enumerate(emas) for k, v in ema.items()},
                       **opt_tensors, **generators_state(gen)}
            state.save("denoiser", step, tensors, {"optimizer": groups, "scheduler": sched.state_dict()})
    bar.close()
    for ema, m in zip(emas, modules):
        m.load_state_dict(ema)
        m.eval().requires_grad_(False)
    return float(loss.item())


def fit_latent_scale(vae, mean: torch.Tensor, std: torch.Tensor, gen: torch.Generator, shift: bool = False):
    """Fit a trained world autoencoder's latent scaling factor (unit std of a posterior draw) and, with ``shift`` (SD3's
    VAE: latents are ``(z - shift) * scale``), its shift factor (the latents' mean), into ``vae``'s config.
    Returns (``mean`` shifted, scaling factor, shift factor or None)."""
    shift_factor = float(mean.mean()) if shift else None
    if shift:
        mean = mean - shift_factor
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling, **({"shift_factor": shift_factor} if shift else {}))
    return mean, scaling, shift_factor
