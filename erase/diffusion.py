"""Diffusion adapter: a Stable Diffusion UNet as an ``erase.core`` adapter.

Loss: the noise-prediction MSE of DDPM training (Ho et al., 2020, eq. 14) at a uniformly drawn timestep, on the
ε or v target the scheduler config names. Forget terms (losses to minimise):

* ``ascent``: −L_f on forget latents under the forget prompts (optionally bounded). A forget image with its own
  caption is conditioned on it, one without on a random forget prompt of the concept (also in ``redirect``).
* ``redirect``: ‖ε_θ(z_t, c_forget) − sg[ε_θ(z_t, c_anchor)]‖² (Concept Ablation, Kumari et al., 2023, model-based).
* ``esd``: ‖ε_θ(x_t, c) − (ε*(x_t) − η(ε*(x_t, c) − ε*(x_t)))‖² with x_t drawn from the frozen base ε* under the
  concept prompt by a random number of DDIM steps (ESD, Gandikota et al., 2023; as in its diffusers code).

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
from erase.core.stream import EndlessStream

_ATTN_PROJ = r"(to_q|to_k|to_v|to_out\.0)\.(weight|bias)"

TARGET_PRESETS: dict[str, str] = {
    "xattn": rf".*\.attn2\.{_ATTN_PROJ}",  # ESD-x / Scissorhands SD default: cross-attention q, k, v, out
    "selfattn": rf".*\.attn1\.{_ATTN_PROJ}",
    # ESD-u (as ESD's train_method "noxattn"): all but cross-attention, the time embedding and the output layers
    "noxattn": r"(?!.*\.attn2\.|time_embedding\.|conv_norm_out\.|conv_out\.).*",
    "full": r".*",
}

_MASK63 = (1 << 63) - 1
_SALTS = {"loss": 1, "redirect": 2, "esd": 3}


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
    # (N,) long, into the set's prompt embedding table: PromptEmbeddings.retain for the retain set; for the forget
    # set PromptEmbeddings.forget_captions (the image's own caption), −1 (or no caption table): a random concept prompt
    prompt_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.mean.shape[0])


@dataclass
class PromptEmbeddings:
    """Text-encoder outputs, computed once (the text encoder is frozen)."""

    forget: torch.Tensor  # (F, L, D): c_forget
    retain: torch.Tensor  # (R, L, D): the retain images' prompts
    anchor: torch.Tensor | None  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D): the empty prompt
    forget_captions: torch.Tensor | None = None  # (C, L, D): the forget images' own captions (x.txt beside x.png)


@torch.no_grad()
def encode_prompts(prompts: list[str], tokenizer, text_encoder, device, batch_size: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i : i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


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
                 frozen_unet: nn.Module | None = None):
        self.model = unet
        self.scheduler = noise_scheduler
        self.emb = embeddings
        self.forget_set, self.retain_set = forget, retain
        self.batch_size = int(batch_size)
        self.scaling_factor = float(scaling_factor)
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device
        self.weight_dtype = weight_dtype
        self.prediction_type = noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.negative_guidance = float(negative_guidance)
        self.esd_ddim_steps = int(esd_ddim_steps)
        self.esd_start_guidance = float(esd_start_guidance)
        self.frozen = frozen_unet

    @staticmethod
    def frozen_copy(unet: nn.Module, dtype=None) -> nn.Module:
        """The frozen base ε* for the ``esd`` term: a copy taken before any trim or update."""
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        return frozen.to(dtype=dtype) if dtype is not None else frozen

    # -- randomness -----------------------------------------------------------------------------------------
    def _draw(self, keys, salt: str, latent_shape) -> dict[str, torch.Tensor]:
        """Per-example timestep, noise, posterior sample and forget-prompt choice."""
        t, noise, eps, choice = [], [], [], []
        for k in keys.tolist():
            g = _generator(k, _SALTS[salt])
            t.append(int(torch.randint(0, self.num_train_timesteps, (1,), generator=g)))
            noise.append(torch.randn(latent_shape, generator=g))
            eps.append(torch.randn(latent_shape, generator=g))
            choice.append(int(torch.randint(0, max(1, self.emb.forget.shape[0]), (1,), generator=g)))
        d = self.device
        return {"t": torch.tensor(t, device=d, dtype=torch.long), "noise": torch.stack(noise).to(d),
                "eps": torch.stack(eps).to(d), "choice": torch.tensor(choice, device=d, dtype=torch.long)}

    def _noisy(self, batch, salt: str):
        lat = batch["set"]
        idx = batch["index"]
        mean, std = lat.mean[idx].to(self.device), lat.std[idx].to(self.device)
        r = self._draw(batch["keys"], salt, tuple(mean.shape[1:]))
        x0 = (mean + std * r["eps"]) * self.scaling_factor
        zt = self.scheduler.add_noise(x0, r["noise"], r["t"])
        target = r["noise"] if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, r["noise"], r["t"])
        return zt, r["t"], target, r

    def _cond(self, batch, r) -> torch.Tensor:
        """Retain: the image's prompt. Forget: the image's own caption, else a random forget prompt of the concept
        (the choice is drawn for every example, so an uncaptioned image draws the same with or without captions)."""
        index = batch["set"].prompt_index[batch["index"]].to(self.device)
        if batch["split"] != "forget":
            return self.emb.retain[index]
        cond = self.emb.forget[r["choice"]]
        if self.emb.forget_captions is None or not bool((index >= 0).any()):
            return cond
        own = self.emb.forget_captions.to(cond.device)[index.clamp_min(0)]
        return torch.where((index >= 0).view(-1, 1, 1), own, cond)

    @staticmethod
    def predict(model, zt, t, cond) -> torch.Tensor:
        return model(zt, t, encoder_hidden_states=cond, return_dict=False)[0]

    # -- losses -------------------------------------------------------------------------------------------
    def loss(self, model, batch) -> torch.Tensor:
        zt, t, target, r = self._noisy(batch, "loss")
        pred = self.predict(model, zt, t, self._cond(batch, r).to(self.weight_dtype))
        return F.mse_loss(pred.float(), target.float())

    def forget_term(self, kind, model, batch, bound=None, **kwargs):
        if kind == "redirect":
            return self._redirect(model, batch)
        if kind == "esd":
            return self._esd(model, batch, float(kwargs.get("eta", self.negative_guidance)))
        return super().forget_term(kind, model, batch, bound=bound, **kwargs)

    def _redirect(self, model, batch) -> torch.Tensor:
        if self.emb.anchor is None:
            raise ValueError("the redirect forget term needs an anchor prompt (--anchor_prompt)")
        zt, t, _, r = self._noisy(batch, "redirect")
        cond = self._cond(batch, r).to(self.weight_dtype)
        anchor = self.emb.anchor.expand(zt.shape[0], -1, -1).to(self.weight_dtype)
        with torch.no_grad():  # the anchor's prediction is a fixed target: no DDP hooks, no graph
            target = self.predict(getattr(model, "module", model), zt, t, anchor)
        pred = self.predict(model, zt, t, cond)
        return F.mse_loss(pred.float(), target.float())

    @torch.no_grad()
    def sample_esd_start(self, batch):
        """x_t from the frozen base under c by s ∈ [0, esd_ddim_steps) DDIM steps, the timestep it sits at
        (``ddim.timesteps[s]``), c and the empty prompt (ESD)."""
        from diffusers import DDIMScheduler

        if self.frozen is None:
            raise ValueError("the esd forget term needs the frozen base UNet (built when --forget_loss/--method is esd)")
        lat = batch["set"]
        shape = tuple(lat.mean.shape[1:])
        keys = batch["keys"].tolist()
        steps, starts, choice = [], [], []
        for k in keys:
            g = _generator(k, _SALTS["esd"])
            steps.append(int(torch.randint(0, self.esd_ddim_steps, (1,), generator=g)))
            starts.append(torch.randn(shape, generator=g))
            choice.append(int(torch.randint(0, self.emb.forget.shape[0], (1,), generator=g)))
        d, n = self.device, len(keys)
        cond = self.emb.forget[torch.tensor(choice, device=d)].to(self.weight_dtype)
        uncond = self.emb.uncond.expand(n, -1, -1).to(self.weight_dtype)
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(self.esd_ddim_steps)
        x = torch.stack(starts).to(d) * ddim.init_noise_sigma
        todo = torch.tensor(steps, device=d)
        for i, t in enumerate(ddim.timesteps[: max(steps) if steps else 0]):
            active = (todo > i).view(-1, 1, 1, 1)
            both = self.predict(self.frozen, torch.cat([x, x]).to(self.weight_dtype), t.to(d), torch.cat([uncond, cond]))
            eu, ec = both.float().chunk(2)
            x = torch.where(active, ddim.step(eu + self.esd_start_guidance * (ec - eu), t, x).prev_sample, x)
        # after s DDIM steps x sits at ddim.timesteps[s]: the loss is taken there (not at 1000 − 1000·s/S)
        t_at = ddim.timesteps[torch.tensor(steps, dtype=torch.long)].to(d)
        return x, t_at, cond, uncond

    def _esd(self, model, batch, eta: float) -> torch.Tensor:
        x, t, cond, uncond = self.sample_esd_start(batch)
        xw = x.to(self.weight_dtype)
        with torch.no_grad():
            e0 = self.predict(self.frozen, xw, t, uncond).float()
            ep = self.predict(self.frozen, xw, t, cond).float()
        pred = self.predict(model, xw, t, cond)
        return F.mse_loss(pred.float(), e0 - eta * (ep - e0))

    # -- data -----------------------------------------------------------------------------------------------
    def _stream(self, split: str, latents: LatentSet, seed: int, rank: int, world: int, batch_size: int) -> KeyedStream:
        def collate(idx, keys):
            return {"split": split, "set": latents, "index": torch.as_tensor(list(idx), dtype=torch.long),
                    "keys": torch.as_tensor(keys, dtype=torch.long)}
        return KeyedStream(len(latents), batch_size, collate, seed=seed, rank=rank, world=world, name=f"{split} set")

    def forget_stream(self, seed, rank=0, world=1):
        return self._stream("forget", self.forget_set, seed, rank, world, min(self.batch_size, len(self.forget_set)))

    def retain_stream(self, seed, rank=0, world=1):
        if self.retain_set is None or len(self.retain_set) == 0:
            raise ValueError("this method needs retain images (--num_retain_images > 0 or --retain_images DIR)")
        return self._stream("retain", self.retain_set, seed, rank, world, self.batch_size)

    def extra_state(self):
        return {"forget_images": len(self.forget_set), "retain_images": len(self.retain_set) if self.retain_set is not None else 0,
                "prediction_type": self.prediction_type, "num_train_timesteps": self.num_train_timesteps,
                "scaling_factor": self.scaling_factor}
