"""The noise-prediction loss the attacks optimise (Ho et al. 2020, eq. 14) and what makes it comparable across
steps: endless shuffled batches, and a fixed batch of noisy latents (the training loss is dominated by its random
timestep and noise)."""

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


class FixedBatch:
    """``draws`` fixed (posterior sample, noise, timestep) draws per image (seed ``FIXED_SEED``), and the mean
    noise-prediction loss of a UNet on them: ``loss(predict)`` with ``predict(noisy, t, image_index) -> output``."""

    def __init__(self, mean, std, scale: float, scheduler, device, draws: int = FIXED_DRAWS, seed: int = FIXED_SEED):
        import torch

        g = torch.Generator().manual_seed(seed)
        n = len(mean)
        self.index = torch.arange(n).repeat_interleave(draws)
        mean, std = mean.cpu()[self.index], std.cpu()[self.index]
        z = (mean + std * torch.randn(mean.shape, generator=g)) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, int(scheduler.config.num_train_timesteps), (len(self.index),), generator=g)
        self.scheduler = scheduler
        self.z, self.noise, self.t = z.to(device), noise.to(device), t.to(device)
        self.noisy = scheduler.add_noise(self.z, self.noise, self.t)
        self.target = noise_target(scheduler, self.z, self.noise, self.t).float()
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
