"""Stage 4, the adapter: a Stable Diffusion UNet and its objective as an ``erase.core`` adapter.

Loss: the noise-prediction MSE of DDPM training (Ho et al., 2020, eq. 14) at a uniformly drawn timestep, on the
ε or v target the scheduler config names. Forget terms (losses to minimise):

* ``ascent``: −L_f on forget latents under the forget prompts (optionally bounded). A forget image with its own
  caption is conditioned on it, one without on a random forget prompt of the concept (also in ``redirect``).
* ``redirect``: ‖ε_θ(z_t, c_forget) − sg[ε_θ(z_t, c_anchor)]‖² (Concept Ablation, Kumari et al., 2023, model-based).
* ``esd``: ‖ε_θ(x_t, c) − (ε*(x_t) − η(ε*(x_t, c) − ε*(x_t)))‖² with x_t drawn from the frozen base ε* under the
  concept prompt by a random number of DDIM steps (ESD, Gandikota et al., 2023; as in its diffusers code).

Retain terms (``retain_mode``): ``data`` is the noise-prediction loss on retain images; ``distill`` keeps the frozen
base's prediction, ‖ε_θ(z, t, c_r) − ε*(z, t, c_r)‖², at freshly drawn pure-noise latents z ~ N(0, I) and uniform t,
for retain prompts c_r of which a share (``distill_empty_fraction``) is the empty prompt (the branch classifier-free
guidance uses): no images, so nothing to memorise (the generated-retain-set fine-tuning of ``data`` collapses the
diversity of what the model draws); ``both`` adds the two.

Several concepts (or captioned forget images) are *groups*: each forget image belongs to one group, draws its
condition among that group's prompts, and is redirected to that group's anchor.

Every random draw of a batch (timestep, noise, latent sample, prompt choice, ESD start code and step count) comes
from a generator seeded by the example's key: (stream seed, draw, position in the *global* batch). A resumed run
therefore draws exactly what an uninterrupted one would, and a run on N processes with batch b sees the same
examples and noise as a run on one process with batch N·b.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from erase.core.adapter import Adapter
from erase.core.sharding import agree_max
from erase.core.stream import EndlessStream
from erase.diffusion.conditioning import PromptEmbeddings
from erase.diffusion.families import UNET_PRESETS
from erase.diffusion.objectives import NoiseObjective

TARGET_PRESETS: dict[str, str] = UNET_PRESETS  # SD 1.x / 2.x; a family's own presets: erase.diffusion.families.FAMILIES[name]

_MASK63 = (1 << 63) - 1
_SALTS = {"loss": 1, "redirect": 2, "esd": 3, "distill": 4}
RETAIN_MODES = ("data", "distill", "both")


def example_key(seed: int, draw: int, position: int) -> int:
    """A 63-bit key for one example of one draw of a stream (splitmix-style mixing, stable across runs)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(draw) * 0xBF58476D1CE4E5B9 + int(position) * 0x94D049BB133111EB) & _MASK63
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) & _MASK63


class KeyedStream(EndlessStream):
    """An :class:`EndlessStream` whose collate also gets one key per example (see :func:`example_key`)."""

    def __next__(self):
        idx = self.next_indices()
        first = self.rank * self.batch_size
        keys = [example_key(self.seed, self.draws, first + j) for j in range(len(idx))]
        return self.collate(idx, keys)


@dataclass
class LatentSet:
    """Cached VAE posteriors of a set of images (unscaled mean and std) and each image's prompt index."""

    mean: torch.Tensor  # (N, C, h, w) float32
    std: torch.Tensor  # (N, C, h, w) float32
    # (N,) long: for the retain set a row of PromptEmbeddings.retain; for the forget set a group of
    # PromptEmbeddings.groups (its concept, or its own caption)
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def _generator(key: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(example_key(key, salt, 0x5EED))


class DiffusionAdapter(Adapter):
    task = "diffusion"
    target_presets = TARGET_PRESETS
    default_targets = "xattn"
    relabel_kind = "redirect"
    forget_kinds = ("ascent", "redirect", "esd")

    def __init__(self, unet: nn.Module, noise_scheduler, embeddings: PromptEmbeddings, forget: LatentSet, retain: LatentSet | None,
                 batch_size: int = 1, scaling_factor: float = 0.18215, device=None, weight_dtype=torch.float32,
                 negative_guidance: float = 1.0, esd_ddim_steps: int = 50, esd_start_guidance: float = 3.0,
                 frozen_unet: nn.Module | None = None, retain_mode: str = "data", distill_empty_fraction: float = 0.1,
                 conditioning=None, target_presets: dict[str, str] | None = None, objective=None, shift_factor: float | None = None):
        self.model = unet
        # packed prompt embedding -> the UNet's keyword arguments (erase.diffusion.families.Conditioner); plain: the
        # embedding is the cross-attention context
        self.conditioning = conditioning or (lambda cond: {"encoder_hidden_states": cond})
        if target_presets is not None:
            self.target_presets = dict(target_presets)
        self.scheduler = noise_scheduler
        self.emb = embeddings
        self.forget_set, self.retain_set = forget, retain
        self.batch_size = int(batch_size)
        self.scaling_factor = float(scaling_factor)
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.weight_dtype = weight_dtype
        # the family's objective (erase.diffusion.objectives): DDPM noise prediction unless the family flows
        self.objective = objective if objective is not None else NoiseObjective(noise_scheduler)
        self.prediction_type = self.objective.prediction_type
        self.num_train_timesteps = self.objective.num_train_timesteps
        self.shift_factor = float(shift_factor) if shift_factor else None  # SD3 / Flux VAEs: latents are (z − shift) · scale
        self.negative_guidance = float(negative_guidance)
        self.esd_ddim_steps = int(esd_ddim_steps)
        self.esd_start_guidance = float(esd_start_guidance)
        self.frozen = frozen_unet
        if retain_mode not in RETAIN_MODES:
            raise ValueError(f"retain mode {retain_mode!r} is not one of {RETAIN_MODES}")
        if retain_mode != "data" and (frozen_unet is None or embeddings.distill is None):
            raise ValueError(f"retain mode {retain_mode!r} needs the frozen base UNet and distillation prompt embeddings")
        if not 0.0 <= float(distill_empty_fraction) <= 1.0:
            raise ValueError(f"distill_empty_fraction must be in [0, 1], got {distill_empty_fraction}")
        self.retain_mode = retain_mode
        self.distill_empty_fraction = float(distill_empty_fraction)
        self._latent_shape = tuple(forget.mean.shape[1:])

    @staticmethod
    def frozen_copy(unet: nn.Module, dtype=None) -> nn.Module:
        """A frozen copy of the whole denoiser (taken before any trim or update); :class:`FrozenBase` is the run's
        default, which shares every weight the run does not train."""
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        return frozen.to(dtype=dtype) if dtype is not None else frozen

    # -- randomness -----------------------------------------------------------------------------------------
    def _choose(self, group: int, g: torch.Generator) -> int:
        """A forget-prompt row of ``group``, drawn from ``g`` (one group of all prompts: a uniform row, as before groups)."""
        rows = self.emb.groups[group]
        return rows[int(torch.randint(0, len(rows), (1,), generator=g))]

    def _draw(self, keys, salt: str, latent_shape, groups=None) -> dict[str, torch.Tensor]:
        """Per-example timestep, noise, posterior sample and forget-prompt choice (within the example's group)."""
        t, noise, eps, choice = [], [], [], []
        groups = groups.tolist() if groups is not None else [0] * len(keys)
        for k, grp in zip(keys.tolist(), groups):
            g = _generator(k, _SALTS[salt])
            t.append(self.objective.draw_t(g))
            noise.append(torch.randn(latent_shape, generator=g))
            eps.append(torch.randn(latent_shape, generator=g))
            choice.append(self._choose(grp, g))
        d = self.device
        return {"t": self.objective.timesteps(t, d), "noise": torch.stack(noise).to(d),
                "eps": torch.stack(eps).to(d), "choice": torch.tensor(choice, device=d, dtype=torch.long)}

    def _noisy(self, batch, salt: str):
        lat = batch["set"]
        idx = batch["index"]
        mean, std = lat.mean[idx].to(self.device), lat.std[idx].to(self.device)
        groups = lat.prompt_index[idx] if batch["split"] == "forget" else None
        r = self._draw(batch["keys"], salt, tuple(mean.shape[1:]), groups)
        z = mean + std * r["eps"]
        x0 = (z - self.shift_factor if self.shift_factor is not None else z) * self.scaling_factor
        zt = self.objective.noisy(x0, r["noise"], r["t"])
        target = self.objective.target(x0, r["noise"], r["t"])
        return zt, r["t"], target, r

    def _cond(self, batch, r) -> torch.Tensor:
        """Retain: the image's prompt. Forget: the row drawn within the image's group (its concept's forget prompts,
        or its own caption: a group of one; one draw per example either way, so the other draws do not move)."""
        if batch["split"] != "forget":
            return self.emb.retain[batch["set"].prompt_index[batch["index"]].to(self.device)]
        return self.emb.forget[r["choice"]]

    def predict(self, model, zt, t, cond) -> torch.Tensor:
        """The model's output (ε, v or the flow velocity, per the objective) for packed conditioning ``cond``; a
        family whose denoiser takes more than its conditioning (Flux: packed latents, position ids) calls it itself."""
        if hasattr(self.conditioning, "predict"):
            return self.conditioning.predict(model, zt, t, cond)
        return model(zt, t, **self.conditioning(cond), return_dict=False)[0]

    # -- losses -------------------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        zt, t, target, r = self._noisy(batch, "loss")
        pred = self.predict(model, zt, t, self._cond(batch, r).to(self.weight_dtype))
        return F.mse_loss(pred.float(), target.float())

    def retain_loss(self, model, batch) -> torch.Tensor:
        if self.retain_mode == "data":
            return self.loss(model, batch)
        term = self.distill_loss(model, batch)
        return term if self.retain_mode == "distill" else self.loss(model, batch) + term

    def distill_loss(self, model, batch) -> torch.Tensor:
        """‖ε_θ(z, t, c) − ε*(z, t, c)‖² at pure-noise z, uniform t, c a distillation prompt or (sometimes) ``""``."""
        t, z, rows = [], [], []
        table = self.emb.distill
        for j, k in enumerate(batch["keys"].tolist()):
            g = _generator(k, _SALTS["distill"])
            t.append(self.objective.draw_t(g))
            z.append(torch.randn(self._latent_shape, generator=g))
            empty = float(torch.rand((1,), generator=g)) < self.distill_empty_fraction
            # a distill batch names its prompt rows; a data batch ("both") draws one per example
            row = int(batch["index"][j]) if batch["split"] == "distill" else int(torch.randint(0, table.shape[0], (1,), generator=g))
            rows.append(-1 if empty else row)
        d = self.device
        zt = torch.stack(z).to(d) * self.objective.init_noise_sigma
        tt = self.objective.timesteps(t, d)
        cond = torch.stack([self.emb.uncond[0] if r < 0 else table[r] for r in rows]).to(d, self.weight_dtype)
        zt = zt.to(self.weight_dtype)
        with torch.no_grad():
            target = self.predict(self.frozen, zt, tt, cond).float()
        pred = self.predict(model, zt, tt, cond)
        return F.mse_loss(pred.float(), target)

    def forget_term(self, kind, model, batch, bound=None, **kwargs):
        if kind == "redirect":
            return self._redirect(model, batch)
        if kind == "esd":  # the objective is ESD's own (erase.core.methods.esd); the adapter supplies x_t and predictions
            from erase.core.methods.esd import esd_term

            return esd_term(self, model, batch, float(kwargs.get("eta", self.negative_guidance)))
        return super().forget_term(kind, model, batch, bound=bound, **kwargs)

    def _redirect(self, model, batch) -> torch.Tensor:
        if self.emb.anchor is None:
            raise ValueError("the redirect forget term needs an anchor prompt")
        zt, t, _, r = self._noisy(batch, "redirect")
        cond = self._cond(batch, r).to(self.weight_dtype)
        groups = batch["set"].prompt_index[batch["index"]].tolist()
        rows = torch.tensor([self.emb.group_anchor[g] for g in groups], device=self.emb.anchor.device)
        anchor = self.emb.anchor[rows].to(self.device, self.weight_dtype)
        with torch.no_grad():  # the anchor's prediction is a fixed target: no DDP hooks, no graph
            target = self.predict(getattr(model, "module", model), zt, t, anchor)
        pred = self.predict(model, zt, t, cond)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample_partial(self, batch):
        """ESD's start point, the scheduler-dependent half of its term: x_t from the frozen base under c by
        s ∈ [0, esd_ddim_steps) steps of the objective's sampler (DDIM; flow-matching Euler for flow families) at
        guidance ``esd_start_guidance`` (s, the start code and c drawn per example from its key), the timestep it sits at
        (``sampler.timesteps[s]``), c and the unconditional embedding."""
        if self.frozen is None:
            raise ValueError("the esd forget term needs the frozen base UNet (frozen_unet)")
        lat = batch["set"]
        shape = tuple(lat.mean.shape[1:])
        keys = batch["keys"].tolist()
        groups = lat.prompt_index[batch["index"]].tolist()
        steps, starts, choice = [], [], []
        for k, grp in zip(keys, groups):
            g = _generator(k, _SALTS["esd"])
            steps.append(int(torch.randint(0, self.esd_ddim_steps, (1,), generator=g)))
            starts.append(torch.randn(shape, generator=g))
            choice.append(self._choose(grp, g))
        d, n = self.device, len(keys)
        cond = self.emb.forget[torch.tensor(choice, device=d)].to(self.weight_dtype)
        uncond = self.emb.uncond.expand(n, -1, -1).to(self.weight_dtype)
        ddim = self.objective.sampler(self.esd_ddim_steps, shape)
        x = torch.stack(starts).to(d) * getattr(ddim, "init_noise_sigma", 1.0)  # flow samplers start at pure noise
        todo = torch.tensor(steps, device=d)
        # a sharded denoiser: every process runs as many steps as the longest (the extra ones leave x as it is)
        for i, t in enumerate(ddim.timesteps[: agree_max(max(steps) if steps else 0, self.model, d)]):
            active = (todo > i).view(-1, 1, 1, 1)
            both = self.predict(self.frozen, torch.cat([x, x]).to(self.weight_dtype), t.to(d), torch.cat([uncond, cond]))
            eu, ec = both.float().chunk(2)
            x = torch.where(active, ddim.step(eu + self.esd_start_guidance * (ec - eu), t, x).prev_sample, x)
        # after s DDIM steps x sits at ddim.timesteps[s]: the loss is taken there (not at 1000 − 1000·s/S)
        t_at = ddim.timesteps[torch.tensor(steps, dtype=torch.long)].to(d)
        return x.to(self.weight_dtype), t_at, cond, uncond

    sample_esd_start = sample_partial  # the name before erase.core.methods.esd owned the ESD objective

    # -- data -----------------------------------------------------------------------------------------------
    def _stream(self, split: str, latents: LatentSet, seed: int, rank: int, world: int, batch_size: int) -> KeyedStream:
        def collate(idx, keys):
            return {"split": split, "set": latents, "index": torch.as_tensor(list(idx), dtype=torch.long),
                    "keys": torch.as_tensor(keys, dtype=torch.long)}
        return KeyedStream(len(latents), batch_size, collate, seed=seed, rank=rank, world=world, name=f"{split} set")

    def forget_stream(self, seed, rank=0, world=1):
        return self._stream("forget", self.forget_set, seed, rank, world, min(self.batch_size, len(self.forget_set)))

    def retain_stream(self, seed, rank=0, world=1):
        if self.retain_mode == "distill":  # no images: a stream over the distillation prompts
            def collate(idx, keys):
                return {"split": "distill", "index": torch.as_tensor(list(idx), dtype=torch.long),
                        "keys": torch.as_tensor(keys, dtype=torch.long)}
            return KeyedStream(int(self.emb.distill.shape[0]), self.batch_size, collate, seed=seed, rank=rank, world=world,
                               name="distillation prompts")
        if self.retain_set is None or len(self.retain_set) == 0:
            raise ValueError("this method needs retain images (the retain latent set is empty)")
        return self._stream("retain", self.retain_set, seed, rank, world, self.batch_size)

    # -- closed-form editors (UCE, SPEED): erase/diffusion/closed_form.py --------------------------------------
    text_view = None  # a closed_form.TextView, set by build_adapter

    def text_layers(self, params):
        if self.text_view is None:
            raise NotImplementedError("this diffusion adapter was built without its prompt tables (build_adapter sets them)")
        return self.text_view.layers(self.model, params)

    def text_features(self, table, stream):
        if self.text_view is None:
            raise NotImplementedError("this diffusion adapter was built without its prompt tables (build_adapter sets them)")
        return self.text_view.features(table, stream)
    # -- end of the closed-form hooks --------------------------------------------------------------------------

    def extra_state(self):
        return {"forget_images": len(self.forget_set), "retain_images": len(self.retain_set) if self.retain_set is not None else 0,
                "retain_mode": self.retain_mode, "distill_empty_fraction": self.distill_empty_fraction,
                "distill_prompts": int(self.emb.distill.shape[0]) if self.emb.distill is not None else 0,
                "forget_groups": len(self.emb.groups), "prediction_type": self.prediction_type, "num_train_timesteps": self.num_train_timesteps,
                **({"objective": self.objective.describe()} if self.objective.kind != "ddpm" else {}),
                **({"shift_factor": self.shift_factor} if self.shift_factor is not None else {}),
                "scaling_factor": self.scaling_factor, **(self.conditioning.describe() if hasattr(self.conditioning, "describe") else {})}


class FrozenBase(nn.Module):
    """The base model ε* without a second copy of it: the trained denoiser itself, called with the base values of the
    tensors the run trains (``torch.func.functional_call``), taken before any trim. Every other weight is shared, so the
    frozen base costs the targeted tensors only (on Flux-dev's text paths 0.7 of 12 B parameters) instead of a copy of the
    whole model; the computation is the same as on a copy (same weights, same code)."""

    def __init__(self, denoiser: nn.Module, targeted: dict, device):
        super().__init__()
        self.denoiser = [denoiser]  # a list: not a submodule (its weights are the run's, never this module's state)
        # ``device``: where the run computes (a sharded run's denoiser is still on the CPU when this is taken)
        self.base = {n: p.detach().to(device, copy=True) for n, p in targeted.items()}

    @property
    def config(self):
        return self.denoiser[0].config

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.denoiser[0], self.base, args, kwargs, strict=False)


def build_adapter(config, parts, placement, data, tables, embeddings: PromptEmbeddings, method, targeted: dict) -> DiffusionAdapter:
    """The run's adapter: the denoiser, the latent sets with their prompt rows, the method's forget term and the retain
    term (the frozen base, taken before any trim, when the esd term or distillation needs it: :class:`FrozenBase`)."""
    forget_kind = getattr(method.config, "forget_loss", None) or ("esd" if config.method == "esd" else None)
    retain_mode = config.objective.retain_loss if method.uses_retain else "data"
    frozen = FrozenBase(parts.denoiser, targeted, placement.device) if forget_kind == "esd" or retain_mode != "data" else None
    forget = LatentSet(*data.latents["forget"], torch.tensor(tables.image_group, dtype=torch.long))
    retain = LatentSet(*data.latents["retain"], torch.tensor(tables.retain_rows, dtype=torch.long)) if data.retain else None
    o = config.objective
    objective = parts.family.make_objective(parts.noise_scheduler, tuple(data.latents["forget"][0].shape[1:]))
    adapter = DiffusionAdapter(parts.denoiser, parts.noise_scheduler, embeddings, forget, retain, batch_size=config.train.train_batch_size,
                               scaling_factor=float(getattr(parts.vae.config, "scaling_factor", 0.18215)), device=placement.device,
                               weight_dtype=placement.weight_dtype, negative_guidance=o.negative_guidance, esd_ddim_steps=o.esd_ddim_steps,
                               esd_start_guidance=o.esd_start_guidance, frozen_unet=frozen, retain_mode=retain_mode,
                               distill_empty_fraction=o.distill_empty_fraction, conditioning=parts.conditioner(placement.resolution),
                               target_presets=parts.family.target_presets, objective=objective,
                               shift_factor=parts.vae.config.get("shift_factor"))
    # closed-form editors read the text-input layers and their inputs per prompt table (computed on first use only)
    from erase.diffusion.closed_form import TextView

    adapter.text_view = TextView(parts.family, parts.text, tables, embeddings, adapter.conditioning, config.concept_set)
    return adapter
