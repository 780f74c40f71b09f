"""The diffusion adversary of ``--robust``: token embeddings learned on the model being erased join the forget term.

An erasure conditioned only on the concept's prompts cuts the concept's *words*: concept inversion (Pham et al., ICLR
2024) then learns a new word on the erased model that draws the concept again. Here the repair meets that attack while
it runs (STEREO, Srivatsan et al. 2024, searches and erases in turns; we interleave both in one run):

* **What it learns.** For each concept, one new token embedding per search (one vector per text encoder of the family,
  each of its encoder's width) by textual inversion (Gal et al., 2023) on the *current* denoiser: Adam on the vector
  alone, text stack and denoiser frozen, minimising the adapter's own noise-prediction loss on the concept's forget
  images (``DiffusionAdapter._noisy``: the same x_t, timestep and ε / v target as training), each image captioned by a
  *template*: one of the concept's forget prompts with its concept words replaced by the token.
* **Concept words** are the words of the concept's forget prompts that no retain prompt uses (for the digit three:
  "three" and "3"), or ``--robust_words``. A forget prompt that names none gives no template; a concept none of whose
  prompts names one has the bare token as its only template.
* **How it joins the forget term.** The kept tokens (the last ``robust_tokens`` searches of each concept), each in each
  of the concept's templates, are encoded by the frozen text stack with the family's packing and appended to the
  forget prompt table; their rows join the forget groups of the concept. Every forget term (redirect, ascent, esd) and
  every pass that draws forget conditions (Scissorhands' saliency and projection memories, SalUn's mask) then treats
  them as it treats the concept's prompts: a forget example draws its condition uniformly from its group.
* **When.** Once before the method's ``prepare``, on the base model (the trim's saliency already sees the adversarial
  conditions), then before every ``robust_every``-th step, on the current model (erase.core.robust.RobustMethod).
  A search starts from the neutral init word (``robust_start init``: the attack's own start) or from the concept's
  newest token (``last``: one long search spread over the run).
* **State.** The kept vectors and the number of searches: checkpointed with the method's tensors (``robust.*``). A
  resume re-encodes them, so the conditions are bit for bit those of the uninterrupted run. Every random draw of a
  search (images, templates, noise, timesteps) comes from generators keyed by (seed, search, concept, step, position in
  the global batch); on N processes each takes every N-th example and the vector gradients are summed across them, so
  N processes search what one process does (up to the order of float sums).

The tokens live only inside the run: the text encoder's vocabulary is not changed. A *marker*, a one-token word that
none of the templates uses, stands in the token's place in the text, and a forward hook on each encoder's input
embeddings puts the learned vector at the marker's positions (as eval/attack's TokenEmbeddingOverride does).
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch
import torch.nn.functional as F

from erase.core.robust import RobustMethod
from erase.core.sharding import is_sharded
from erase.diffusion.adapter import example_key
from erase.utils.errors import UserError

#: The choices of ``--robust``, made on the digits model's tuning digits seven and one only (docs/ROBUST.md).
# point D of the tuning grid, the one the written rule chose on the tuning digits seven and one (docs/ROBUST.md)
ROBUST_DEFAULTS = {"robust_every": 25, "robust_tokens": 4, "robust_steps": 100, "robust_lr": 5e-3, "robust_batch_size": 8,
                   "robust_start": "last"}
ROBUST_STARTS = ("init", "last")
#: neutral words a search starts from (as textual-inversion attacks do): the first one-token word, else the first word's
#: mean token embedding
INIT_WORDS = ("object", "thing", "image", "picture")
MARKERS = ("x", "z", "q", "j", "v", "k", "w", "y")  # one-token words on CLIP-like tokenizers; the first unused one is taken
_SALT = 0xAD7E


# -------------------------------------------------------------------------------------------------- configuration
def check_robust(config) -> None:
    """Check the robust section and fill its defaults (called by erase/diffusion/validate.py); one line per bad value."""
    r = config.robustness
    given = {k: v for k, v in asdict(r).items() if k != "robust" and v is not None}
    if not r.robust:
        if given:
            raise UserError(f"--{sorted(given)[0]} is an option of the robust erasure; add --robust (or drop it)")
        return
    from erase.core.registry import get_method_class

    if not get_method_class(config.method, "diffusion").uses_forget:
        raise UserError(f"--robust adds adversarial conditions to the forget term; --method {config.method} has none "
                        "(use scissorhands, esd, salun or ga)")
    for name, value in ROBUST_DEFAULTS.items():
        if getattr(r, name) is None:
            setattr(r, name, value)
    for name in ("robust_every", "robust_tokens", "robust_steps", "robust_batch_size"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"--{name} must be an integer >= 1, got {value!r}")
    if not (isinstance(r.robust_lr, float) and r.robust_lr > 0 and r.robust_lr < float("inf")):
        raise UserError(f"--robust_lr must be a finite number > 0, got {r.robust_lr!r}")
    if r.robust_start not in ROBUST_STARTS:
        raise UserError(f"--robust_start {r.robust_start!r} is not one of {', '.join(ROBUST_STARTS)}")
    if r.robust_words is not None and not [w for w in r.robust_words.split(",") if w.strip()]:
        raise UserError(f"--robust_words {r.robust_words!r} names no word (give comma-separated words, e.g. three,3)")
    if r.robust_init_word is not None and len(r.robust_init_word.split()) != 1:
        raise UserError(f"--robust_init_word must be one word, got {r.robust_init_word!r}")


def robust_settings(config) -> dict:
    """What the adversary's result depends on, one key per option (a resume names the one that differs): compared before a
    resume, added to the run settings only with --robust."""
    return {k: v for k, v in asdict(config.robustness).items()}


# -------------------------------------------------------------------------------------------------- words and templates
def _words(prompt: str) -> list[str]:
    return re.findall(r"[\w']+", prompt.lower())


def concept_words(forget_prompts: list[str], retain_prompts: list[str], name: str, given: str | None = None) -> list[str]:
    """``given`` (comma-separated), else the words of the forget prompts that no retain prompt uses, else the name."""
    if given:
        return list(dict.fromkeys(w.strip().lower() for w in given.split(",") if w.strip()))
    kept = {w for p in retain_prompts for w in _words(p)}
    words = [w for p in forget_prompts for w in _words(p) if w not in kept]
    return list(dict.fromkeys(words)) or [name.replace("_", " ").lower()]


def templates(forget_prompts: list[str], words: list[str]) -> list[str]:
    """The forget prompts that name a concept word, each word (and a plural s / es) replaced by ``{}``; adjacent
    replacements merge into one. None names one: the bare token ``["{}"]``."""
    alternatives = sorted((re.escape(w) for w in words), key=len, reverse=True)
    pattern = re.compile(r"(?<![\w])(?:" + "|".join(alternatives) + r")(?:s|es)?(?![\w])", re.IGNORECASE)
    out = []
    for p in forget_prompts:
        if not pattern.search(p):
            continue
        t = " ".join(pattern.sub("{}", p.replace("{", "(").replace("}", ")")).split())
        while "{} {}" in t:
            t = t.replace("{} {}", "{}")
        out.append(t)
    return list(dict.fromkeys(out)) or ["{}"]


def one_token(tokenizer, word: str) -> int | None:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return ids[0] if len(ids) == 1 else None


def pick_marker(tokenizers, texts: list[str]) -> tuple[str, list[int]]:
    """A one-token word (every tokenizer) that, put in each ``{}`` of ``texts``, is found exactly there."""
    for word in MARKERS:
        ids = [one_token(t, word) for t in tokenizers]
        if None in ids:
            continue
        if all(t(x.format(*[word] * x.count("{}"))).input_ids.count(i) == x.count("{}") for x in texts
               for t, i in zip(tokenizers, ids)):
            return word, ids
    raise UserError(f"none of the marker words {', '.join(MARKERS)} is a free single token of this tokenizer; "
                    "--robust cannot place its tokens")


def _word_vector(tokenizer, encoder, word: str) -> torch.Tensor:
    """A word's input embedding: its token's row, or the mean of its tokens' rows when the tokenizer splits it."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"--robust_init_word {word!r} gives no token")
    return encoder.get_input_embeddings().weight[ids].detach().float().mean(0).clone()


class TokenInjection:
    """While active, each text encoder's token-embedding output at its marker id is replaced by that encoder's vector
    (a forward hook on each token-embedding module its forward calls: T5's ``embed_tokens`` as well as ``shared``;
    gradients reach the vectors)."""

    def __init__(self, encoders, marker_ids: list[int], vectors: list[torch.Tensor]):
        self.items = list(zip(encoders, marker_ids, vectors))
        self.handles = []

    @staticmethod
    def _hook(marker: int, vec: torch.Tensor):
        def hook(module, inputs, output):
            mask = inputs[0] == marker
            if not bool(mask.any()):
                return output
            out = output.clone()
            out[mask] = vec.to(out.dtype)
            return out
        return hook

    def __enter__(self):
        from erase.diffusion.families.base import token_embedding_modules

        self.handles = [module.register_forward_hook(self._hook(m, v)) for enc, m, v in self.items
                        for module in token_embedding_modules(enc)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


# -------------------------------------------------------------------------------------------------- the adversary
class TokenAdversary:
    """Learned token embeddings per concept (see the module docstring); an :class:`erase.core.robust.Adversary`."""

    def __init__(self, adapter, text, concepts: list[dict], group_concept: list[int], image_concept: list[int], *,
                 tokens: int, steps: int, lr: float, batch_size: int, start: str, init_word: str | None, seed: int,
                 device):
        self.adapter, self.text, self.device = adapter, text, torch.device(device)
        self.tokens, self.steps, self.lr, self.batch_size, self.start, self.seed = tokens, steps, lr, batch_size, start, int(seed)
        self.concepts = concepts  # [{"name", "words", "templates"}]
        self.images = [[i for i, c in enumerate(image_concept) if c == k] for k in range(len(concepts))]
        for k, found in enumerate(self.images):
            if not found:
                raise UserError(f"--robust: concept {concepts[k]['name']!r} has no forget image to learn its tokens from")
        self.group_concept = list(group_concept)
        every_text = [t for c in concepts for t in c["templates"]]
        self.marker, self.marker_ids = pick_marker(text.tokenizers, every_text)
        self.init_word = init_word or next((w for w in INIT_WORDS if all(one_token(t, w) is not None for t in text.tokenizers)),
                                           INIT_WORDS[0])
        self.init = [_word_vector(t, enc, self.init_word) for t, enc in zip(text.tokenizers, text.encoders)]
        emb = adapter.emb
        self.base_forget, self.base_groups = emb.forget, [list(g) for g in emb.groups]
        self.pool: list[list[list[torch.Tensor]]] = [[] for _ in concepts]  # concept -> kept tokens -> one vector per encoder
        self.count = 0  # searches made (every concept searches once per refresh)

    # -- encoding -------------------------------------------------------------------------------------------
    def _texts(self, k: int) -> list[str]:
        return [t.format(*[self.marker] * t.count("{}")) for t in self.concepts[k]["templates"]]

    def encode(self, k: int, vectors: list[torch.Tensor], grad: bool = False) -> torch.Tensor:
        """The templates of concept ``k`` with ``vectors`` in the token's place, packed as the family packs prompts."""
        texts = self._texts(k)
        with TokenInjection(self.text.encoders, self.marker_ids, vectors):
            if not grad:
                return self.text.encode(texts, self.device)
            plain = getattr(type(self.text).encode, "__wrapped__", None)  # the family's encode without its no_grad
            with torch.enable_grad():
                return plain(self.text, texts, self.device) if plain is not None else self.text.encode(texts, self.device)

    def install(self) -> None:
        """The forget table and groups: the concepts' prompts, then every kept token in every template of its concept."""
        emb = self.adapter.emb
        rows, groups, at = [self.base_forget], [list(g) for g in self.base_groups], int(self.base_forget.shape[0])
        for k, kept in enumerate(self.pool):
            for vectors in kept:
                enc = self.encode(k, vectors).to(self.base_forget.device, self.base_forget.dtype)
                new = list(range(at, at + enc.shape[0]))
                at += enc.shape[0]
                rows.append(enc)
                for g, c in enumerate(self.group_concept):
                    if c == k:
                        groups[g] += new
        emb.forget = torch.cat(rows) if len(rows) > 1 else self.base_forget
        emb.groups = groups

    # -- the search -----------------------------------------------------------------------------------------
    def _search(self, ctx, unet, k: int) -> tuple[list[torch.Tensor], dict]:
        acc = ctx.accelerator
        rank, world = acc.process_index, acc.num_processes
        adapter = self.adapter
        start = self.pool[k][-1] if self.start == "last" and self.pool[k] else self.init
        vectors = [v.detach().clone().to(self.device).requires_grad_(True) for v in start]
        opt = torch.optim.Adam(vectors, lr=self.lr)
        search_seed = example_key(self.seed, _SALT + self.count, k)
        g = torch.Generator().manual_seed(search_seed)
        images = torch.tensor(self.images[k], dtype=torch.long)
        n_templates, b = len(self.concepts[k]["templates"]), self.batch_size
        mine = list(range(rank, b, world))
        sharded = is_sharded(unet)
        losses = []
        for step in range(self.steps):
            pick = images[torch.randint(0, len(images), (b,), generator=g)]
            which = torch.randint(0, n_templates, (b,), generator=g)
            keys = torch.tensor([example_key(search_seed, step, p) for p in range(b)], dtype=torch.long)
            if mine or sharded:  # a sharded denoiser's forward is collective: every process runs one
                take = mine or [0]  # more processes than examples: a sharded one still runs, weighted 0
                batch = {"split": "forget", "set": adapter.forget_set, "index": pick[take], "keys": keys[take]}
                with acc.autocast():
                    zt, t, target, _ = adapter._noisy(batch, "loss")
                    cond = self.encode(k, vectors, grad=True)[which[take].to(self.device)]
                    pred = adapter.predict(unet, zt, t, cond.to(adapter.weight_dtype))
                    loss = F.mse_loss(pred.float(), target.float(), reduction="sum") / (b * pred[0].numel()) * (1.0 if mine else 0.0)
                grads = torch.autograd.grad(loss, vectors)
                value = loss.detach()
            else:  # more processes than examples: this one adds nothing
                grads, value = [torch.zeros_like(v) for v in vectors], torch.zeros((), device=self.device)
            if world > 1:
                grads = [acc.reduce(x, reduction="sum") for x in grads]
                value = acc.reduce(value, reduction="sum")
            for v, x in zip(vectors, grads):
                v.grad = x
            opt.step()
            losses.append(float(value))
        last = losses[-min(10, len(losses)):]
        return [v.detach().float().clone() for v in vectors], {"loss_first": losses[0], "loss_last10": sum(last) / len(last)}

    def refresh(self, ctx, model, step: int) -> dict:
        unet = getattr(model, "module", model)
        logs = {}
        found = []
        for k in range(len(self.concepts)):
            vectors, info = self._search(ctx, unet, k)
            found.append(vectors)
            suffix = "" if len(self.concepts) == 1 else f"_{self.concepts[k]['name']}"
            logs[f"robust_loss_first{suffix}"] = info["loss_first"]
            logs[f"robust_loss_last{suffix}"] = info["loss_last10"]
        for k, vectors in enumerate(found):
            self.pool[k] = (self.pool[k] + [vectors])[-self.tokens:]
        self.count += 1
        self.install()
        return logs

    # -- state ----------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {"count": torch.tensor([self.count], dtype=torch.int64)}
        for k, kept in enumerate(self.pool):
            for j, vectors in enumerate(kept):
                for e, v in enumerate(vectors):
                    out[f"vec.{k}.{j}.{e}"] = v
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.count = int(tensors["count"][0]) if "count" in tensors else 0
        self.pool = [[] for _ in self.concepts]
        found = sorted({tuple(int(x) for x in key.split(".")[1:3]) for key in tensors if key.startswith("vec.")})
        n_enc = len(self.text.encoders)
        for k, j in found:
            if k >= len(self.concepts):
                raise ValueError(f"the checkpoint's adversary has tokens of concept {k}; this run has {len(self.concepts)}")
            self.pool[k].append([tensors[f"vec.{k}.{j}.{e}"].to(self.device).float() for e in range(n_enc)])
        self.install()

    def describe(self) -> dict:
        return {"concepts": [{"name": c["name"], "words": c["words"], "templates": c["templates"]} for c in self.concepts],
                "marker": self.marker, "init_word": self.init_word, "tokens_kept": self.tokens, "search_steps": self.steps,
                "search_lr": self.lr, "search_batch_size": self.batch_size, "start": self.start,
                "learns": "one token embedding per text encoder and concept per search (textual inversion on the current "
                         "denoiser, text stack frozen); kept tokens join the concept's forget groups in every template"}


def build_robust(config, parts, placement, data, tables, adapter, method):
    """The method wrapped with a :class:`TokenAdversary` when ``--robust`` is on; the method itself otherwise."""
    r = config.robustness
    if not r.robust:
        return method
    concepts, retain = config.concept_set.concepts, config.concept_set.retain_prompts
    specs = []
    for c in concepts:
        words = concept_words(c.forget_prompts, retain, c.name, r.robust_words)
        specs.append({"name": c.name, "words": words, "templates": templates(c.forget_prompts, words)})
    image_concept = list(data.forget.concept_of())
    group_concept = [-1] * len(tables.groups)
    for k in range(len(concepts)):
        group_concept[k] = k
    for i, g in enumerate(tables.image_group):
        group_concept[g] = image_concept[i]
    adversary = TokenAdversary(adapter, parts.text, specs, group_concept, image_concept, tokens=r.robust_tokens,
                               steps=r.robust_steps, lr=r.robust_lr, batch_size=r.robust_batch_size, start=r.robust_start,
                               init_word=r.robust_init_word, seed=config.train.seed, device=placement.device)
    return RobustMethod(method, adversary, r.robust_every)
