"""The judge of the digits benchmark: a small CNN trained on real digits, which scores generated images.

It plays the part NudeNet plays in the nudity audit: ``predict`` gives the digit a generation shows,
``features`` the 128-d penultimate activations used for a Fréchet distance to real digits (Heusel et al.,
2017, eq. 6, with this classifier in place of Inception). Cached as safetensors + a JSON config, keyed by a hash
of its settings, in ``$ERASE_CACHE/digits/judge-<hash>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.digits.model import cache_root, load_digit_images, split_indices

logger = logging.getLogger(__name__)

JUDGE_VERSION = 1


@dataclass
class JudgeConfig:
    resolution: int = 16
    seed: int = 0
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    test_fraction: float = 0.2
    split_seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps({"config": asdict(self), "version": JUDGE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DigitNet(nn.Module):
    """conv 32 -> conv 64 /2 -> conv 64 /2 -> fc 128 (features) -> fc 10, on one grey channel in [-1, 1]."""

    def __init__(self, resolution: int = 16):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(64 * (resolution // 4) ** 2, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to one pixel and a little pixel noise, so generations that are slightly off still count."""
    dx, dy = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


class DigitJudge:
    """A trained :class:`DigitNet` plus its config and test accuracy; images in, digits and features out."""

    def __init__(self, net: DigitNet, config: JudgeConfig, meta: dict):
        self.net, self.config, self.meta = net.eval(), config, meta

    @staticmethod
    def to_input(images) -> torch.Tensor:
        """Pipeline output (``(N, H, W, 3)`` floats in [0, 1], or uint8) -> ``(N, 1, R, R)`` grey in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images))
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.float()
        if x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = x.mean(1, keepdim=True)
        return x * 2 - 1

    @torch.no_grad()
    def predict(self, images, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Predicted digits ``(N,)`` and features ``(N, 128)``; ``grey=True`` if already in judge input form."""
        x = images if grey else self.to_input(images)
        r = self.config.resolution
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False)
        feats = self.net.features(x)
        return self.net.head(feats).argmax(1).numpy(), feats.numpy().astype(np.float64)


def judge_dir(cfg: JudgeConfig) -> Path:
    return cache_root() / "digits" / f"judge-{cfg.fingerprint()}"


def load_judge(cfg: JudgeConfig | None = None, progress: bool = False) -> DigitJudge:
    """The cached judge for ``cfg``, trained first if absent (a few seconds)."""
    from safetensors.torch import load_file, save_file

    cfg = cfg or JudgeConfig()
    folder = judge_dir(cfg)
    weights, card = folder / "judge.safetensors", folder / "judge.json"
    if weights.is_file() and card.is_file():
        net = DigitNet(cfg.resolution)
        net.load_state_dict(load_file(str(weights)))
        return DigitJudge(net, cfg, json.loads(card.read_text()))
    net, meta = train_judge(cfg, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"fingerprint": cfg.fingerprint(), "config": json.dumps(asdict(cfg), sort_keys=True)})
    card.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    tmp.rename(weights)
    return DigitJudge(net, cfg, meta)


def train_judge(cfg: JudgeConfig, progress: bool = False) -> tuple[DigitNet, dict]:
    """Train on the train split of sklearn digits; returns the net and a card with the test accuracy."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = load_digit_images(cfg.resolution)
    tr, te = split_indices(len(x), cfg.test_fraction, cfg.split_seed)
    net = DigitNet(cfg.resolution)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * int(np.ceil(len(tr) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    xtr, ytr = x[tr], y[tr]
    net.train()
    for _ in tqdm(range(cfg.epochs), desc="train digit judge", disable=not progress):
        perm = torch.randperm(len(tr), generator=gen)
        for i in range(0, len(tr), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(net(_augment(xtr[b], gen)), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = net(x[te]).argmax(1)
    per_digit = {str(d): float((pred[y[te] == d] == d).float().mean()) for d in range(10)}
    meta = {"kind": "digits-judge", "version": JUDGE_VERSION, "fingerprint": cfg.fingerprint(), "config": asdict(cfg),
            "test_accuracy": float((pred == y[te]).float().mean()), "test_accuracy_per_digit": per_digit,
            "n_train": int(len(tr)), "n_test": int(len(te))}
    logger.info("digit judge test accuracy %.4f", meta["test_accuracy"])
    return net, meta


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al., 2017, eq. 6).

    tr((S1 S2)^1/2) is computed as the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a
    symmetric PSD matrix, which stays real and stable for rank-deficient covariances (few samples)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, u = np.linalg.eigh(s1)
    sq1 = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sq1 @ s2 @ sq1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
