"""The search of unlearndiffatk (Zhang et al., ECCV 2024): k adversarial tokens before a prompt, optimised so the
attacked UNet denoises an image of the concept as well as it can.

Following the reference code (OPTML-Group/Diffusion-MU-Attack, ``src/attackers/text_grad_.py`` with
``sequential``; ``src/tasks/classifier_.py``), the timesteps are visited in ``blocks`` fixed values, ascending
(``T // n // 2 + b T // n``: 10, 30, ..., 990 for 50 blocks), each for a number of iterations with a fresh noise per
iteration; the loss is the MSE of the UNet's prediction to its target on the target image's VAE posterior mean.

Unlike the reference (a relaxed one-hot over the whole vocabulary, sampled each iteration), the variables are k
token embeddings projected every iteration to the nearest *candidate* token embedding (cosine) with straight-through
gradients (PEZ, Wen et al. 2023), so the forward pass always sees real tokens and the kept prompt is text anyone can
type. Several restarts of one prompt are one batch: one text-encoder and one UNet forward per iteration for all
of them, each restart with its own generator (its noises do not depend on the others)."""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("adam", "adamw")


def block_timesteps(blocks: int, num_train_timesteps: int) -> list[int]:
    """The reference's ``sampled_t``: ``blocks`` timesteps, ascending, one per block."""
    start = num_train_timesteps // blocks // 2
    return list(range(start, num_train_timesteps, num_train_timesteps // blocks))[:blocks]


def judged_blocks(blocks: int, every: int) -> list[int]:
    """The blocks (1-based counts) after which the prompt is judged: every ``every`` and the last."""
    return sorted({b for b in range(every, blocks + 1, every)} | {blocks})


@dataclass
class OptimizerSpec:
    name: str  # adam: L2 weight decay added to the gradient (torch.optim.Adam); adamw: decoupled (torch.optim.AdamW)
    lr: float
    weight_decay: float

    def build(self, params):
        import torch

        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    def describe(self) -> dict:
        return {"name": self.name, "lr": self.lr, "weight_decay": self.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                "decay": "L2 added to the gradient (torch.optim.Adam)" if self.name == "adam"
                else "decoupled, lr x weight_decay x embedding per step (torch.optim.AdamW)",
                "on": "adversarial token embeddings (restarts x k x D), initialised to k random candidate tokens"}


class PrefixSearch:
    """The adversarial prefixes of one prompt, ``len(seeds)`` restarts optimised together.

    ``cand``: (V, D) candidate token embeddings, ``cand_ids`` their token ids; ``ids``: (1, L) the prompt's ids with
    ``k`` placeholders after BOS; ``x0``: (1, C, H, W) the target's latents; ``init``: (R, k) indices into ``cand``.
    """

    def __init__(self, unet, text_encoder, scheduler, cand, cand_ids, ids, x0, init, seeds, optimizer: OptimizerSpec):
        import torch
        import torch.nn.functional as F

        from eval.attack.utils.losses import noise_target

        self.unet, self.enc, self.sched, self.noise_target = unet, text_encoder, scheduler, noise_target
        self.cand, self.cand_ids = cand, torch.as_tensor(cand_ids, device=cand.device)
        self.cand_unit = F.normalize(cand, dim=1)
        self.k = init.shape[1]
        self.ids, self.x0 = ids, x0
        self.adv = torch.nn.Parameter(cand[init.to(cand.device)].clone())  # (R, k, D)
        self.opt = optimizer.build([self.adv])
        self.weight_decay = optimizer.weight_decay if optimizer.name == "adam" else 0.0
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.decay_ratio: list[float] = []  # |weight decay term| / |loss gradient| per restart and step (Adam's L2)

    def nearest(self, rows=None):
        """(R', k) candidate indices nearest (cosine) to the current embeddings of ``rows`` (default: all)."""
        import torch.nn.functional as F

        x = self.adv.detach() if rows is None else self.adv.detach()[rows]
        return (F.normalize(x, dim=-1) @ self.cand_unit.T).argmax(-1)

    def token_ids(self, rows=None) -> list[list[int]]:
        return self.cand_ids[self.nearest(rows)].tolist()

    def encode(self, embeds):
        """Text-encoder output of the prompt with positions 1..k replaced by ``embeds`` (R', k, D)."""
        from eval.attack.utils.tokens import TokenEmbeddingOverride

        n = embeds.shape[0]
        ids = self.ids.expand(n, -1)

        def rows(input_ids):
            mask = input_ids.new_zeros(input_ids.shape, dtype=bool)
            mask[:, 1:1 + self.k] = True
            return mask, embeds.reshape(-1, embeds.shape[-1])

        with TokenEmbeddingOverride(self.enc, rows):
            return self.enc(ids)[0].float()

    def step(self, t: int, rows: list[int]) -> list[float]:
        """One iteration at timestep ``t`` for the restarts ``rows`` (one batch); their losses."""
        import torch

        idx = self.nearest(rows)
        x = self.adv[rows] + (self.cand[idx] - self.adv[rows]).detach()  # straight-through: real tokens forward
        cond = self.encode(x)
        noise = torch.stack([torch.randn(self.x0.shape[1:], generator=self.generators[r]) for r in rows]).to(self.x0.device)
        tt = torch.full((len(rows),), int(t), device=self.x0.device, dtype=torch.long)
        x0 = self.x0.expand(len(rows), -1, -1, -1)
        pred = self.unet(self.sched.add_noise(x0, noise, tt), tt, cond).sample
        target = self.noise_target(self.sched, x0, noise, tt)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # each restart's own mean loss
        self.opt.zero_grad(set_to_none=True)
        per.sum().backward()
        if self.weight_decay:
            with torch.no_grad():
                g = self.adv.grad[rows].flatten(1).norm(dim=1)
                d = self.weight_decay * self.adv[rows].flatten(1).norm(dim=1)
                self.decay_ratio += (d / g.clamp_min(1e-30)).tolist()
        self.opt.step()
        return per.detach().tolist()
