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
of them, each restart with its own generator (its noises do not depend on the others).

A family with several text encoders (SDXL, SD3, Flux) has one embedding variable per encoder, the candidates being
the words that are one token in every tokenizer (``utils.text.shared_typable``); the projection picks, per position,
the one word whose embeddings are nearest in all encoders together (the sum of the cosines), so every encoder sees
the same typed word. With one encoder this is the projection above, unchanged. The loss is the family's own
objective (``utils.losses.Denoising``: noise prediction for the UNets, flow-matching velocity for SD3 / Flux)."""

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


def one_encoder(text_encoder, ids, k: int):
    """``encode`` for a one-encoder family (SD 1.x / 2.x): the prompt's ``ids`` (1, L) with positions 1..k replaced
    by the adversarial embeddings, the encoder's last hidden states."""
    from eval.attack.utils.tokens import TokenEmbeddingOverride

    def encode(embeds: list):
        (x,) = embeds
        n = x.shape[0]

        def rows(input_ids):
            mask = input_ids.new_zeros(input_ids.shape, dtype=bool)
            mask[:, 1:1 + k] = True
            return mask, x.reshape(-1, x.shape[-1])

        with TokenEmbeddingOverride(text_encoder, rows):
            return text_encoder(ids.expand(n, -1))[0].float()

    return encode


class PrefixSearch:
    """The adversarial prefixes of one prompt, ``len(seeds)`` restarts optimised together.

    ``model``: the attacked denoiser; ``denoising``: its family's objective (``utils.losses.Denoising``); ``encode``:
    one (R', k, D_e) embedding per text encoder -> the denoiser's conditioning; ``cand``: one (V, D_e) candidate
    embedding table per encoder (row v of each is the same word), ``cand_ids`` the first tokenizer's ids of the
    candidates; ``x0``: (1, C, H, W) the target's latents; ``init``: (R, k) indices into the candidates.
    """

    def __init__(self, model, denoising, encode, cand: list, cand_ids, x0, init, seeds, optimizer: OptimizerSpec):
        import torch
        import torch.nn.functional as F

        self.model, self.den, self.encode = model, denoising, encode
        self.cand, self.cand_ids = list(cand), torch.as_tensor(cand_ids, device=cand[0].device)
        self.cand_unit = [F.normalize(c, dim=1) for c in self.cand]
        self.k = init.shape[1]
        self.x0 = x0
        self.adv = [torch.nn.Parameter(c[init.to(c.device)].clone()) for c in self.cand]  # per encoder (R, k, D_e)
        self.opt = optimizer.build(self.adv)
        self.weight_decay = optimizer.weight_decay if optimizer.name == "adam" else 0.0
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.decay_ratio: list[float] = []  # |weight decay term| / |loss gradient| per restart and step (Adam's L2)

    def nearest(self, rows=None):
        """(R', k) candidate indices nearest (cosine; summed over the encoders) to the current embeddings of ``rows``."""
        import torch
        import torch.nn.functional as F

        sims = []
        for adv, unit in zip(self.adv, self.cand_unit):
            x = adv.detach() if rows is None else adv.detach()[rows]
            sims.append(F.normalize(x, dim=-1) @ unit.T)
        return torch.stack(sims).sum(0).argmax(-1)

    def token_ids(self, rows=None) -> list[list[int]]:
        return self.cand_ids[self.nearest(rows)].tolist()

    def step(self, t: int, rows: list[int]) -> list[float]:
        """One iteration at block timestep ``t`` for the restarts ``rows`` (one batch); their losses."""
        import torch

        idx = self.nearest(rows)
        x = [a[rows] + (c[idx] - a[rows]).detach() for a, c in zip(self.adv, self.cand)]  # straight-through
        cond = self.encode(x)
        noise = torch.stack([torch.randn(self.x0.shape[1:], generator=self.generators[r]) for r in rows]).to(self.x0.device)
        tt = self.den.full_timesteps(t, len(rows), self.x0.device)
        x0 = self.x0.expand(len(rows), -1, -1, -1)
        pred = self.den.predict(self.model, self.den.noisy(x0, noise, tt), tt, cond)
        target = self.den.target(x0, noise, tt)
        per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # each restart's own mean loss
        self.opt.zero_grad(set_to_none=True)
        per.sum().backward()
        if self.weight_decay:
            with torch.no_grad():
                g = torch.cat([a.grad[rows].flatten(1) for a in self.adv], 1).norm(dim=1)
                d = self.weight_decay * torch.cat([a[rows].flatten(1) for a in self.adv], 1).norm(dim=1)
                self.decay_ratio += (d / g.clamp_min(1e-30)).tolist()
        self.opt.step()
        return per.detach().tolist()
