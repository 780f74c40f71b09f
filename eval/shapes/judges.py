"""The judges of the shapes world: five small CNNs trained on renders, which read a generated image.

* ``count`` (whole image -> 0..3 objects) and ``relation`` (whole image of two objects -> side by side or stacked)
  give the layout, and with it the slot windows (:func:`eval.shapes.render.slot_boxes`);
* ``object``, ``colour`` and ``texture`` read each slot window (resized to 32 px): shape / colour / texture, or
  ``none`` for an empty window.

They play the part NudeNet plays in the nudity audit. Each is trained on its own stream of renders (seeds never
used by a model) with shifts, blur, noise and small brightness changes, so slightly-off generations still count,
and tested on held-out renders; its card records the version, the settings' hash, the weights' hash and the test
accuracy. The concatenated penultimate features of the three window judges on the whole image are the feature
space of the Fréchet distance (Heusel et al., 2017, eq. 6, with these judges in place of Inception).
Cached as safetensors + a JSON card in ``$ERASE_CACHE/shapes/judge-<name>-<hash>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.shapes import world
from eval.shapes.model import cache_root, world_signature
from eval.shapes.render import BACKGROUND_RGB, cached_renders, render, slot_boxes

logger = logging.getLogger(__name__)

JUDGE_VERSION = 1
INPUT = 32  # every judge reads 32x32 RGB in [-1, 1]
CROP_JUDGES = ("object", "colour", "texture")
IMAGE_JUDGES = ("count", "relation")
JUDGE_NAMES = CROP_JUDGES + IMAGE_JUDGES
CLASSES = {"object": world.SHAPES + ("none",), "colour": world.COLOURS + ("none",), "texture": world.TEXTURES + ("none",),
           "count": ("0", "1", "2", "3"), "relation": ("h2", "v2")}
ATTRIBUTE = {"object": "shape", "colour": "colour", "texture": "texture"}
EMPTY_SHARE = 0.05  # of the judges' scenes are empty backgrounds


@dataclass
class JudgeConfig:
    resolution: int = 32
    num_train_scenes: int = 12000
    num_test_scenes: int = 3000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    width: int = 32
    feature_dim: int = 64
    seed: int = 0
    data_seed: int = 7_000_001  # the judges' scene stream: world.scene_seed keys of three numbers, never a model's two

    def fingerprint(self, name: str) -> str:
        blob = json.dumps({"name": name, "config": asdict(self), "world": world_signature(), "version": JUDGE_VERSION},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class JudgeNet(nn.Module):
    """conv w -> conv 2w /2 -> conv 2w -> conv 4w /2 -> conv 4w /2 (each + batch norm + ReLU) -> fc ``feature_dim``
    (features) -> classes."""

    def __init__(self, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        w = width
        layers = []
        for cin, cout, stride in ((3, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w * (INPUT // 8) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------- inputs
def to_input(images) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 (or floats in [0, 1]) -> ``(N, 3, H, W)`` floats in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x * 2 - 1


def _resize(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[-1] == INPUT and x.shape[-2] == INPUT else F.interpolate(
        x, size=(INPUT, INPUT), mode="bilinear", align_corners=False, antialias=True)


def crop_windows(x: torch.Tensor, layouts: list[str], jitter: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The slot windows of each image (for its layout), resized to the judges' input: ``(M, 3, 32, 32)`` and the
    (image, slot) of each. ``jitter`` (M, 2) shifts windows by whole pixels (training only)."""
    side = x.shape[-1]
    out, where = [], []
    for i, layout in enumerate(layouts):
        if layout == "none":
            continue
        for k, (x0, y0, x1, y1) in enumerate(slot_boxes(layout, side)):
            if jitter is not None:
                dx, dy = (int(v) for v in jitter[len(where)])
                dx = max(-x0, min(side - x1, dx))
                dy = max(-y0, min(side - y1, dy))
                x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
            out.append(_resize(x[i : i + 1, :, y0:y1, x0:x1]))
            where.append((i, k))
    return (torch.cat(out) if out else torch.zeros(0, 3, INPUT, INPUT)), where


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to one pixel, a random blur, pixel noise and a small brightness change per image."""
    n = len(x)
    dx, dy = torch.randint(-1, 2, (2,), generator=gen).tolist()
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    sigma = torch.rand(n, generator=gen) * 0.8
    r = torch.arange(-1, 2, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])  # (n, 3, 3)
    blurred = F.conv2d(F.pad(x.reshape(1, n * 3, *x.shape[2:]), (1, 1, 1, 1), mode="replicate"),
                       k2.repeat_interleave(3, 0)[:, None], groups=n * 3).reshape(x.shape)
    x = torch.where((torch.rand(n, generator=gen) < 0.6)[:, None, None, None], blurred, x)
    scale = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.08
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    return ((x + 1) * scale - 1 + noise).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------- data
def judge_scenes(cfg: JudgeConfig, split: str) -> list:
    """The judges' scenes of one split: world scenes (kinds in equal shares) and ``EMPTY_SHARE`` empty ones (None)."""
    n = cfg.num_train_scenes if split == "train" else cfg.num_test_scenes
    code = {"train": 0, "test": 1}[split]
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([cfg.data_seed, code, i])
        scenes.append(None if rng.random() < EMPTY_SHARE else world.sample_scene(rng, mix=(1, 1, 1)))
    return scenes


def _background(scene, index: int, side: int) -> np.ndarray:
    bg = world.BACKGROUNDS[index % len(world.BACKGROUNDS)] if scene is None else scene.background
    return np.broadcast_to(np.asarray(BACKGROUND_RGB[bg], np.uint8), (side, side, 3)).copy()


def judge_data(cfg: JudgeConfig, split: str) -> tuple[list, np.ndarray]:
    """Scenes and renders of a split, renders cached in ``$ERASE_CACHE/shapes/judge-data-<hash>-<split>.npy``."""
    scenes = judge_scenes(cfg, split)
    key = hashlib.sha256(json.dumps({"n": len(scenes), "seed": cfg.data_seed, "split": split, "r": cfg.resolution,
                                     "world": world_signature()}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "shapes" / f"judge-data-{key}-{split}.npy"
    return scenes, cached_renders(path, len(scenes), lambda: np.stack(
        [_background(s, i, cfg.resolution) if s is None else render(s, cfg.resolution) for i, s in enumerate(scenes)]))


def layout_of(scene) -> str:
    return "none" if scene is None else scene.layout


def labels(name: str, scenes) -> torch.Tensor:
    """Class indices of judge ``name``: per scene (image judges) or per slot window in crop order (crop judges);
    an empty scene gives one ``none`` window (its whole image)."""
    cls = CLASSES[name]
    if name == "count":
        return torch.tensor([0 if s is None else s.count for s in scenes])
    if name == "relation":
        return torch.tensor([cls.index(s.layout) for s in scenes if s is not None and s.count == 2])
    out = []
    for s in scenes:
        if s is None:
            out.append(cls.index("none"))
        else:
            out += [cls.index(getattr(o, ATTRIBUTE[name])) for o in s.objects]
    return torch.tensor(out)


def inputs(name: str, scenes, images: np.ndarray, gen: torch.Generator | None = None) -> torch.Tensor:
    """The inputs of judge ``name`` for these scenes (augmented when ``gen`` is given), aligned with :func:`labels`."""
    x = to_input(images)
    if gen is not None:
        x = augment(x, gen)
    if name == "count":
        return _resize(x)
    if name == "relation":
        keep = [i for i, s in enumerate(scenes) if s is not None and s.count == 2]
        return _resize(x[keep])
    layouts = ["one" if s is None else s.layout for s in scenes]  # an empty image: its whole window is "none"
    n = sum(len(world.SLOTS[lay]) for lay in layouts)
    jitter = torch.randint(-1, 2, (n, 2), generator=gen) if gen is not None else None
    return crop_windows(x, layouts, jitter)[0]


# ----------------------------------------------------------------------------------------------- training
def train_judge(name: str, cfg: JudgeConfig, progress: bool = False) -> tuple[JudgeNet, dict]:
    """Train judge ``name`` on its training renders; returns the net and its card (test accuracy on held-out renders)."""
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scenes, images = judge_data(cfg, "train")
    y_all = labels(name, scenes)
    net = JudgeNet(len(CLASSES[name]), cfg.width, cfg.feature_dim)
    steps_per_epoch = max(1, int(np.ceil(len(y_all) / cfg.batch_size)))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    # batches of scenes, so crops of one scene share its augmentation; about batch_size inputs per step
    per_scene = max(1e-9, len(y_all) / max(1, len(scenes)))
    scene_batch = max(1, int(round(cfg.batch_size / per_scene)))
    net.train()
    for _ in tqdm(range(cfg.epochs), desc=f"train {name} judge", disable=not progress):
        perm = torch.randperm(len(scenes), generator=gen).tolist()
        for i in range(0, len(perm), scene_batch):
            idx = perm[i : i + scene_batch]
            sub = [scenes[j] for j in idx]
            y = labels(name, sub)
            if len(y) == 0:
                continue
            x = inputs(name, sub, images[idx], gen)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched.last_epoch + 1 < sched.total_steps:
                sched.step()
    net.eval()
    test_scenes, test_images = judge_data(cfg, "test")
    acc, per_class, n_test = evaluate(net, name, test_scenes, test_images)
    robust, _, _ = evaluate(net, name, test_scenes, test_images, torch.Generator().manual_seed(cfg.seed + 1))
    card = {"kind": "shapes-judge", "name": name, "version": JUDGE_VERSION, "fingerprint": cfg.fingerprint(name),
            "config": asdict(cfg), "classes": list(CLASSES[name]), "test_accuracy": acc,
            "test_accuracy_augmented": robust, "test_accuracy_per_class": per_class, "n_test": n_test,
            "n_train": int(len(y_all)),
            "test_set": "renders of judge_scenes(cfg, 'test'): seeds (data_seed, 1, i), never a model's or the training split's"}
    logger.info("%s judge: test accuracy %.4f (augmented %.4f)", name, acc, robust)
    return net, card


@torch.no_grad()
def evaluate(net: JudgeNet, name: str, scenes, images, gen=None) -> tuple[float, dict, int]:
    preds, ys = [], []
    for i in range(0, len(scenes), 512):
        sub = scenes[i : i + 512]
        y = labels(name, sub)
        if len(y):
            preds.append(net(inputs(name, sub, images[i : i + 512], gen)).argmax(1))
            ys.append(y)
    pred, y = torch.cat(preds), torch.cat(ys)
    per = {c: float((pred[y == k] == k).float().mean()) for k, c in enumerate(CLASSES[name]) if (y == k).any()}
    return float((pred == y).float().mean()), per, int(len(y))


def judge_dir(name: str, cfg: JudgeConfig) -> Path:
    return cache_root() / "shapes" / f"judge-{name}-{cfg.fingerprint(name)}"


def load_judge(name: str, cfg: JudgeConfig | None = None, progress: bool = False) -> tuple[JudgeNet, dict]:
    """The cached judge ``name`` for ``cfg``, trained first if absent."""
    from safetensors.torch import load_file, save_file

    cfg = cfg or JudgeConfig()
    folder = judge_dir(name, cfg)
    weights, card_path = folder / "judge.safetensors", folder / "judge.json"
    net = JudgeNet(len(CLASSES[name]), cfg.width, cfg.feature_dim)
    if weights.is_file() and card_path.is_file():
        net.load_state_dict(load_file(str(weights)))
        return net.eval(), json.loads(card_path.read_text())
    net, card = train_judge(name, cfg, progress)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".judge.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"fingerprint": cfg.fingerprint(name), "name": name, "version": str(JUDGE_VERSION)})
    card["weights_sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, weights)
    return net, card


# ----------------------------------------------------------------------------------------------- reading images
@dataclass
class Reading:
    """What the judges see in one image: the layout (``none`` when empty) and the objects in slot order."""

    count: int
    layout: str
    objects: list  # world.Obj per slot

    def values(self) -> set[str]:
        return {v for o in self.objects for v in (o.shape, o.colour, o.texture)}


class Judges:
    """The five judges together: ``read`` images into :class:`Reading` s, ``features`` for Fréchet distances."""

    def __init__(self, nets: dict, cards: dict, config: JudgeConfig):
        self.nets, self.cards, self.config = nets, cards, config

    def describe(self) -> dict:
        """Versions, hashes and accuracies, for a summary's settings."""
        return {name: {k: card.get(k) for k in ("version", "fingerprint", "weights_sha256", "test_accuracy",
                                                "test_accuracy_augmented", "n_test")}
                for name, card in self.cards.items()}

    @torch.no_grad()
    def read(self, images) -> list[Reading]:
        x = to_input(images)
        whole = _resize(x)
        counts = torch.cat([self.nets["count"](whole[i : i + 512]).argmax(1) for i in range(0, len(whole), 512)]).tolist()
        rel = torch.cat([self.nets["relation"](whole[i : i + 512]).argmax(1) for i in range(0, len(whole), 512)]).tolist()
        layouts = [("none", "one", CLASSES["relation"][r], "three")[c] for c, r in zip(counts, rel)]
        crops, where = crop_windows(x, layouts)
        found = {}
        for name in CROP_JUDGES:
            found[name] = torch.cat([self.nets[name](crops[i : i + 512]).argmax(1) for i in range(0, len(crops), 512)]).tolist() if len(crops) else []
        objects: list[list] = [[] for _ in layouts]
        for j, (i, _) in enumerate(where):
            objects[i].append(world.Obj(CLASSES["object"][found["object"][j]], CLASSES["colour"][found["colour"][j]],
                                        CLASSES["texture"][found["texture"][j]]))
        return [Reading(c, lay, objs) for c, lay, objs in zip(counts, layouts, objects)]

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """``(N, 3 * feature_dim)``: the window judges' penultimate features of the whole image."""
        x = _resize(to_input(images))
        return torch.cat([torch.cat([self.nets[n].features(x[i : i + 512]) for i in range(0, len(x), 512)], 0)
                          for n in CROP_JUDGES], 1).numpy().astype(np.float64)


def load_judges(cfg: JudgeConfig | None = None, progress: bool = False) -> Judges:
    """All five judges for ``cfg`` (cached; each trained first if absent)."""
    cfg = cfg or JudgeConfig()
    nets, cards = {}, {}
    for name in JUDGE_NAMES:
        nets[name], cards[name] = load_judge(name, cfg, progress)
    return Judges(nets, cards, cfg)
