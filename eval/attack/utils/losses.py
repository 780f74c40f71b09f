"""The denoising loss the attacks optimise, in the attacked family's own terms (:class:`Denoising`: the objective and
conditioner erase/sd.py trains with; noise prediction, Ho et al. 2020 eq. 14, for the UNets, rectified-flow velocity
for SD3 / Flux) and what makes it comparable across steps: endless shuffled batches, and a fixed batch of noisy
latents (the training loss is dominated by its random timestep and noise)."""

from __future__ import annotations

from erase.utils.errors import UserError

FIXED_DRAWS = 4  # fixed (noise, timestep) draws per image for the eval loss of relearn and inversion
FIXED_SEED = 1234


def endless_batches(n: int, batch_size: int, generator):
    """Indices in successive random permutations of range(n), ``batch_size`` at a time (an epoch-free stream)."""
    import torch

    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer += torch.randperm(n, generator=generator).tolist()
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def noise_target(scheduler, latents, noise, timesteps):
    """What the UNet is trained to predict: the noise (epsilon) or v (Salimans & Ho, 2022), per the scheduler."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise UserError(f"scheduler prediction_type {kind!r} is not epsilon or v_prediction")


class Denoising:
    """The attacked denoiser under its family's objective, as the erasure trains it (erase.diffusion.objectives:
    ``NoiseObjective`` / ``FlowObjective``; the family's conditioner: SDXL's pooled and size ids, SD3's pooled
    projections, Flux's packed latents and position ids). ``text`` is the family's text stack (``pipeline_text``).

    UNet families keep the attacks' batched draws (one ``randint`` of timesteps per batch), so their losses are what
    they were; flow families draw each timestep from the family's shifted logit-normal density (``draw_t``)."""

    def __init__(self, family, scheduler, conditioner, latent_shape: tuple, scale: float, shift: float | None = None):
        self.family, self.scheduler, self.conditioner = family, scheduler, conditioner
        try:
            self.objective = family.make_objective(scheduler, tuple(latent_shape))
        except ValueError as e:
            raise UserError(str(e)) from None
        self.num_t = int(scheduler.config.num_train_timesteps)
        self.scale, self.shift = float(scale), shift if self.objective.kind == "flow" else None

    @classmethod
    def of_pipeline(cls, pipe, text, resolution: int, latent_shape: tuple, model=None) -> "Denoising":
        """The family's objective over the pipeline's scheduler config (DDPM, or flow-matching Euler with its shift)
        and conditioner; ``model``: the denoiser whose config the conditioner reads (default: the pipeline's)."""
        import diffusers

        from eval.attack.utils.models import denoiser_of

        flow = text.family.objective == "flow"
        sched = getattr(diffusers, "FlowMatchEulerDiscreteScheduler" if flow else "DDPMScheduler").from_config(pipe.scheduler.config)
        cond = text.family.make_conditioner(resolution, text, model if model is not None else denoiser_of(pipe))
        return cls(text.family, sched, cond, latent_shape, float(getattr(pipe.vae.config, "scaling_factor", 0.18215)),
                   pipe.vae.config.get("shift_factor"))

    @classmethod
    def sd1(cls, scheduler, scale: float = 0.18215) -> "Denoising":
        """An SD 1.x UNet under ``scheduler`` (a DDPM config): the hidden states are its whole conditioning."""
        from erase.diffusion.families import FAMILIES, Conditioner

        return cls(FAMILIES["sd1"], scheduler, Conditioner(FAMILIES["sd1"]), (), scale)

    @property
    def flow(self) -> bool:
        return self.objective.kind == "flow"

    def latents(self, z):
        """VAE latents (unscaled) -> what the denoiser sees, as erase/sd.py scales them."""
        return (z - self.shift) * self.scale if self.shift is not None else z * self.scale

    def timesteps(self, n: int, generator, device):
        import torch

        if not self.flow:
            return torch.randint(0, self.num_t, (n,), generator=generator).to(device)
        return self.objective.timesteps([self.objective.draw_t(generator) for _ in range(n)], device)

    def block_timestep(self, t: int) -> float | int:
        """A block of unlearndiffatk's schedule (``t`` in [0, num_t)): the same timestep for a UNet; for a flow
        family the sigma ``t / num_t`` through the family's shift, on the denoiser's ``1000 sigma`` scale."""
        return int(t) if not self.flow else self.objective.shifted(t / self.num_t) * self.num_t

    def full_timesteps(self, t, n: int, device):
        import torch

        dtype = torch.float32 if self.flow else torch.long
        return torch.full((n,), self.block_timestep(t), device=device, dtype=dtype)

    def sample(self, mean, std, idx, generator):
        """(latents, noise, timesteps) of the images ``idx``: a posterior sample, a noise and a timestep from ``generator``."""
        import torch

        device = mean.device
        z = self.latents(mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator).to(device))
        noise = torch.randn(z.shape, generator=generator).to(device)
        return z, noise, self.timesteps(len(idx), generator, device)

    def noisy(self, x0, noise, t):
        return self.objective.noisy(x0, noise, t)

    def target(self, x0, noise, t):
        return self.objective.target(x0, noise, t)

    def predict(self, model, zt, t, cond):
        """The denoiser's output for packed conditioning ``cond`` (erase.diffusion.adapter.DiffusionAdapter.predict)."""
        if hasattr(self.conditioner, "predict"):
            return self.conditioner.predict(model, zt, t, cond)
        return model(zt, t, **self.conditioner(cond)).sample

    def loss(self, model, z, noise, t, cond):
        import torch.nn.functional as F

        pred = self.predict(model, self.noisy(z, noise, t), t, cond)
        return F.mse_loss(pred.float(), self.target(z, noise, t).float())

    @property
    def prediction_type(self) -> str:
        return self.objective.prediction_type

    def describe(self, what: str) -> str:
        """The loss in words, for the settings."""
        if not self.flow:
            return (f"MSE to the {self.prediction_type} target of the attacked {what}, timesteps uniform in [0, {self.num_t}), "
                    f"latents = VAE posterior sample x {self.scale:.5g}")
        shift = f"shift {self.objective.shift}" if self.objective.shift is not None else f"dynamic mu {self.objective.mu:.4g}"
        return (f"rectified-flow velocity MSE (target noise - x0) of the attacked {what}, sigma logit-normal(0, 1) with the "
                f"family's {shift}, latents = (VAE posterior sample - {self.shift}) x {self.scale:.5g}")


class FixedBatch:
    """``draws`` fixed (posterior sample, noise, timestep) draws per image (seed ``FIXED_SEED``), and the mean
    denoising loss of a model on them: ``loss(predict)`` with ``predict(noisy, t, image_index) -> output``."""

    def __init__(self, mean, std, denoising: Denoising, device, draws: int = FIXED_DRAWS, seed: int = FIXED_SEED):
        import torch

        g = torch.Generator().manual_seed(seed)
        n = len(mean)
        self.index = torch.arange(n).repeat_interleave(draws)
        mean, std = mean.cpu()[self.index], std.cpu()[self.index]
        z = denoising.latents(mean + std * torch.randn(mean.shape, generator=g))
        noise = torch.randn(z.shape, generator=g)
        t = denoising.timesteps(len(self.index), g, "cpu")
        self.z, self.noise, self.t = z.to(device), noise.to(device), t.to(device)
        self.noisy = denoising.noisy(self.z, self.noise, self.t)
        self.target = denoising.target(self.z, self.noise, self.t).float()
        self.draws, self.seed = draws, seed

    def loss(self, predict, batch_size: int) -> float:
        import torch
        import torch.nn.functional as F

        total = 0.0
        with torch.no_grad():
            for i in range(0, len(self.index), batch_size):
                sl = slice(i, i + batch_size)
                pred = predict(self.noisy[sl], self.t[sl], self.index[sl])
                total += F.mse_loss(pred.float(), self.target[sl], reduction="sum").item()
        return total / self.z.numel()

    def describe(self) -> str:
        return f"the same loss on a fixed batch ({self.draws} draws of noise and timestep per image, seed {self.seed})"
