"""The training objective of a family, in its own terms: how a timestep is drawn, how a clean latent is noised, what
the denoiser is asked to predict, and the sampler ESD's partial trajectory takes.

* :class:`NoiseObjective` (SD 1.x / 2.x / XL): DDPM (Ho et al., 2020, eq. 14): t uniform over the
  ``num_train_timesteps`` of the training scheduler, ``z_t = scheduler.add_noise(x0, ε, t)``, target ε or
  ``v = scheduler.get_velocity(x0, ε, t)`` (the scheduler config's ``prediction_type``); ESD samples on DDIM.
* :class:`FlowObjective` (SD3 / SD3.5 / Flux): rectified flow (Esser et al., 2024): σ ~ logit-normal(0, 1) shifted
  as the family's scheduler shifts it (SD3: ``shift`` 3, ``σ' = sσ / (1 + (s−1)σ)``; Flux: the resolution-dependent
  ``μ`` of its pipeline's ``calculate_shift``, ``σ' = e^μ / (e^μ + 1/σ − 1)``), ``z_σ = (1−σ)·x0 + σ·ε``, target the
  velocity ``ε − x0``; the denoiser's timestep is ``1000·σ`` (the scheduler's scale); ESD samples on the family's
  flow-matching Euler scheduler.

Every draw comes from the per-example generator the adapter hands in, so resumes and process counts stay exact.
"""

from __future__ import annotations

import math

import torch


class NoiseObjective:
    """DDPM noise prediction (epsilon or v) over the training scheduler's discrete timesteps."""

    kind = "ddpm"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not epsilon or v_prediction")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def draw_t(self, g: torch.Generator):
        return int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))

    def timesteps(self, values: list, device) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.long)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)

    @property
    def init_noise_sigma(self) -> float:
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def sampler(self, steps: int, latent_shape: tuple):
        """ESD's sampler of the partial trajectory: DDIM over the same schedule."""
        from diffusers import DDIMScheduler

        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps)
        return ddim

    def describe(self) -> dict:
        return {"objective": self.kind, "prediction_type": self.prediction_type, "num_train_timesteps": self.num_train_timesteps}


class FlowObjective:
    """Rectified-flow velocity prediction with the family's logit-normal, shifted timestep density."""

    kind = "flow"
    prediction_type = "velocity"  # what the denoiser predicts: ε − x0

    def __init__(self, scheduler, latent_shape: tuple, logit_mean: float = 0.0, logit_std: float = 1.0, patch: int = 1):
        self.scheduler = scheduler
        cfg = scheduler.config
        self.num_train_timesteps = int(cfg.num_train_timesteps)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.dynamic = bool(cfg.get("use_dynamic_shifting", False))
        if self.dynamic:  # Flux: mu from the image's token count, as its pipeline's calculate_shift
            seq = (latent_shape[-1] // patch) * (latent_shape[-2] // patch)
            base_seq, max_seq = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
            base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
            slope = (top - base) / (max_seq - base_seq)
            self.mu, self.shift = seq * slope + base - slope * base_seq, None
        else:
            self.mu, self.shift = None, float(cfg.get("shift", 1.0))

    def shifted(self, sigma: float) -> float:
        if self.dynamic:
            return math.exp(self.mu) / (math.exp(self.mu) + (1.0 / sigma - 1.0))
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)

    def draw_t(self, g: torch.Generator) -> float:
        """``1000·σ'`` with ``σ = sigmoid(N(mean, std))`` and ``σ'`` the family's shift of it."""
        u = float(torch.randn((1,), generator=g)) * self.logit_std + self.logit_mean
        sigma = min(max(1.0 / (1.0 + math.exp(-u)), 1e-6), 1.0 - 1e-6)
        return self.shifted(sigma) * self.num_train_timesteps

    def timesteps(self, values: list, device) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.float32)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.float() / self.num_train_timesteps).view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self._sigma(t, x0)
        return (1.0 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def sampler(self, steps: int, latent_shape: tuple):
        """ESD's sampler of the partial trajectory: the family's flow-matching Euler scheduler (with its shift)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        euler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        euler.set_timesteps(steps, mu=self.mu) if self.dynamic else euler.set_timesteps(steps)
        return euler

    def describe(self) -> dict:
        return {"objective": self.kind, "prediction_type": "velocity", "timestep_density": "logit_normal",
                "logit_mean": self.logit_mean, "logit_std": self.logit_std,
                "shift": self.shift if not self.dynamic else {"dynamic_mu": self.mu}, "num_train_timesteps": self.num_train_timesteps}
