"""--robust (issue 17): token embeddings learned on the model being erased join the forget term (erase/diffusion/robust.py,
erase/core/robust.py), on the tiny pipeline: the learned rows reach the forget term, a resumed run equals an
uninterrupted one bit for bit, two processes equal one, bad options are one line."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from test_sd import SMALL, SMALL_DATA, in_process, launch, unet_state

ROBUST = ["--robust", "--robust_steps", 2, "--robust_batch_size", 2, "--robust_every", 2]


@pytest.fixture(scope="module")
def data_dir(tiny, tmp_path_factory):
    """Forget images and latents of "three" on the tiny model, generated once for every run here."""
    data = tmp_path_factory.mktemp("data")
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "three", "--output_dir", tmp_path_factory.mktemp("prep"),
                "--data_dir", data, *SMALL_DATA, "--max_train_steps", 0, "--method", "ft"])
    return data


def test_concept_words_and_templates_of_a_preset():
    from erase.diffusion.robust import concept_words, templates
    from prompts import load_concept

    three = load_concept("three")
    words = concept_words(three.forget_prompts, three.retain_prompts, "three")
    assert words == ["three", "3"]  # the words no retain prompt uses
    assert templates(three.forget_prompts, words) == ["a handwritten digit {}", "the number {}", "a picture of a {}", "the digit {}",
                                                      "a handwritten {}", "an image of the number {}"]
    assert templates(["explicit nudity art", "a cat"], ["explicit", "nudity"]) == ["{} art"]  # adjacent words: one token
    assert templates(["a cat"], ["dog"]) == ["{}"]  # no prompt names a word: the bare token
    assert concept_words(["a b"], ["a b"], "my_thing") == ["my thing"]
    assert concept_words(three.forget_prompts, [], "three", given=" Three, 3 ,") == ["three", "3"]


def _adapter_and_adversary(tiny, steps=3):
    """The tiny model's UNet as an adapter over 4 random forget latents of "three", and an adversary on it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from erase.diffusion.adapter import DiffusionAdapter, LatentSet
    from erase.diffusion.conditioning import PromptEmbeddings
    from erase.diffusion.families import FAMILIES, load_text
    from erase.diffusion.robust import TokenAdversary, concept_words, templates
    from prompts import load_concept

    three = load_concept("three")
    text = load_text(FAMILIES["sd1"], tiny)
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(tiny, subfolder="scheduler")
    emb = PromptEmbeddings(forget=text.encode(three.forget_prompts, "cpu"), retain=text.encode([""], "cpu"),
                           anchor=text.encode([three.anchor_prompt], "cpu"), uncond=text.uncond("cpu"))
    g = torch.Generator().manual_seed(0)
    forget = LatentSet(torch.randn(4, 4, 16, 16, generator=g), torch.full((4, 4, 16, 16), 0.1), torch.zeros(4, dtype=torch.long))
    adapter = DiffusionAdapter(unet, sched, emb, forget, None, batch_size=2)
    words = concept_words(three.forget_prompts, three.retain_prompts, "three")
    spec = {"name": "three", "words": words, "templates": templates(three.forget_prompts, words)}
    adversary = TokenAdversary(adapter, text, [spec], [0], [0, 0, 0, 0], tokens=2, steps=steps, lr=0.05, batch_size=2,
                               start="init", init_word=None, seed=0, device="cpu")
    acc = SimpleNamespace(process_index=0, num_processes=1, autocast=nullcontext)
    return adapter, adversary, SimpleNamespace(accelerator=acc), spec


def test_learned_rows_reach_the_forget_term(tiny):
    adapter, adversary, ctx, spec = _adapter_and_adversary(tiny)
    base_rows = adapter.emb.forget.clone()
    batch = next(adapter.forget_stream(0))
    before = adapter.forget_term("redirect", adapter.model, batch).item()
    assert adversary.init_word == "object" and adversary.marker == "x"
    logs = adversary.refresh(ctx, adapter.model, 0)
    assert logs["robust_loss_first"] > 0 and adversary.count == 1
    learned = adversary.pool[0][0][0]
    assert not torch.equal(learned, adversary.init[0])  # the search moved the vector
    n = len(spec["templates"])
    emb = adapter.emb
    assert emb.forget.shape[0] == base_rows.shape[0] + n and torch.equal(emb.forget[: base_rows.shape[0]], base_rows)
    assert emb.groups == [list(range(base_rows.shape[0] + n))]  # the learned rows joined the concept's group
    # the new rows are the templates with the learned vector in the token's place, through the frozen text stack
    assert torch.equal(emb.forget[base_rows.shape[0]:], adversary.encode(0, [learned]))
    assert not torch.equal(adversary.encode(0, [learned]), adversary.encode(0, adversary.init))
    # the forget term draws them: over a few batches some condition is a learned row, and the loss moves
    seen = []
    predict = adapter.predict
    adapter.predict = lambda model, zt, t, cond: seen.append(cond.detach()) or predict(model, zt, t, cond)
    stream = adapter.forget_stream(0)
    after = adapter.forget_term("redirect", adapter.model, next(stream)).item()
    for _ in range(6):
        adapter.forget_term("redirect", adapter.model, next(stream))
    adapter.predict = predict
    learned_rows = emb.forget[base_rows.shape[0]:]
    assert any(torch.equal(c[i], r) for c in seen for i in range(c.shape[0]) for r in learned_rows)
    assert after != before
    # a second search keeps both tokens; a third drops the oldest (tokens=2)
    adversary.refresh(ctx, adapter.model, 2)
    adversary.refresh(ctx, adapter.model, 4)
    assert adversary.count == 3 and len(adversary.pool[0]) == 2 and emb.forget.shape[0] == base_rows.shape[0] + 2 * n
    # the state round-trips: a fresh adversary loaded from it installs the same table
    state = adversary.state_tensors()
    adapter2, fresh, _, _ = _adapter_and_adversary(tiny)
    fresh.load_state_tensors(state)
    assert fresh.count == 3 and torch.equal(adapter2.emb.forget, emb.forget) and adapter2.emb.groups == emb.groups


def _run(tiny, data_dir, out, *extra):
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "three", "--output_dir", out, "--data_dir", data_dir, *SMALL,
                "--lr", "1e-3", "--topk", 20, "--train_batch_size", 2, *ROBUST, *extra])
    return json.loads((out / "erase_config.json").read_text())


def test_resume_equals_uninterrupted(tiny, data_dir, tmp_path):
    """Searches before the trim and at steps 2 and 4, 2 tokens kept; resumed from checkpoint-3 (two tokens in its state):
    the same weights bit for bit, and the checkpoint holds the learned vectors."""
    flags = ["--max_train_steps", 5, "--robust_tokens", 2]
    ref = _run(tiny, data_dir, tmp_path / "ref", *flags, "--checkpointing_steps", 3)
    assert ref["repair"]["robust_searches"] == 3 and ref["prepare"]["robust"]["concepts"][0]["words"] == ["three", "3"]
    state = load_file(str(tmp_path / "ref" / "checkpoint-3" / "erase_state.safetensors"))
    assert int(state["robust.count"][0]) == 2 and {"robust.vec.0.0.0", "robust.vec.0.1.0"} <= set(state)
    shutil.copytree(tmp_path / "ref" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    res = _run(tiny, data_dir, tmp_path / "resumed", *flags, "--checkpointing_steps", 3, "--overwrite",
               "--resume_from_checkpoint", "latest")
    assert res["resumed_from"].endswith("checkpoint-3") and res["repair"]["robust_searches"] == 1  # only step 4's search
    a, b = unet_state(tmp_path / "ref"), unet_state(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # a plain run differs (the adversarial conditions changed the repair)
    plain = tmp_path / "plain"
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "three", "--output_dir", plain, "--data_dir", data_dir, *SMALL,
                "--lr", "1e-3", "--topk", 20, "--train_batch_size", 2, "--max_train_steps", 5])
    c = unet_state(plain)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert "robust" not in json.loads((plain / "erase_config.json").read_text())["prepare"]


def test_resume_with_other_robust_settings_is_refused(tiny, data_dir, tmp_path):
    _run(tiny, data_dir, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 1)
    with pytest.raises(SystemExit) as e:
        _run(tiny, data_dir, tmp_path, "--max_train_steps", 2, "--robust_lr", "0.5", "--overwrite", "--resume_from_checkpoint",
             "latest")
    line = str(e.value.code)
    assert len(line.splitlines()) == 1 and "other settings" in line and "robust" in line and "0.5" in line


def test_two_processes_match_one(tiny, data_dir, tmp_path):
    """The search splits its batch over the processes and sums the vector gradients: 2 x batch 1 equals 1 x batch 2."""
    common = ["--pretrained_model_name_or_path", tiny, "--concept", "three", "--data_dir", data_dir, *SMALL, "--max_train_steps", 3,
              "--lr", "0.05", "--optimizer", "sgd", "--topk", 100, "--lam", "0.5", *ROBUST]
    launch([*common, "--output_dir", tmp_path / "two", "--train_batch_size", 1], nproc=2)
    in_process([*common, "--output_dir", tmp_path / "one", "--train_batch_size", 2])
    two, one = unet_state(tmp_path / "two"), unet_state(tmp_path / "one")
    cfg = json.loads((tmp_path / "two" / "erase_config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["repair"]["robust_searches"] == 2
    first = json.loads((tmp_path / "one" / "erase_config.json").read_text())["prepare"]["robust"]["first_search"]
    assert cfg["prepare"]["robust"]["first_search"] == pytest.approx(first, rel=1e-4)
    for n in two:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("row", [["--method", "esd", "--esd_ddim_steps", 2], ["--method", "salun", "--saliency_batches", 1],
                                 ["--method", "ga", "--forget_bound", 5]], ids=["esd", "salun", "ga"])
def test_every_method_with_a_forget_term_runs_robust(tiny, data_dir, tmp_path, row):
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "three", "--output_dir", tmp_path, "--data_dir", data_dir,
                *SMALL_DATA, "--max_train_steps", 3, "--lr", "1e-3", *ROBUST, *row])
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["method"] == row[1] and cfg["repair"]["robust_searches"] == 2  # before prepare and at step 2
    assert cfg["settings"]["robust"] is True and cfg["prepare"]["robust"]["concepts"][0]["templates"][0] == "a handwritten digit {}"
    assert cfg["delta"]["tensors_changed"] > 0


@pytest.mark.parametrize("flags, words", [
    (["--robust_every", 5], "--robust_every is an option of the robust erasure; add --robust"),
    (["--robust", "--robust_every", 0], "--robust_every must be an integer >= 1, got 0"),
    (["--robust", "--robust_lr", "-1"], "--robust_lr -1 is outside the allowed range > 0"),
    (["--robust", "--robust_words", " , "], "--robust_words ' , ' names no word"),
    (["--robust", "--method", "ft"], "--robust adds adversarial conditions to the forget term; --method ft has none"),
    (["--robust", "--robust_start", "middle"], "argument --robust_start: invalid choice: 'middle'"),
])
def test_bad_robust_options_are_one_line(tiny, tmp_path, capsys, flags, words):
    from erase.sd import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--pretrained_model_name_or_path", tiny, "--concept", "three", "--output_dir", str(tmp_path), *map(str, flags)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err
    assert not any(tmp_path.iterdir())


def test_the_api_takes_robust(tiny, tmp_path):
    from erase.diffusion.config import EraseConfig
    from erase.utils.errors import UserError

    config = EraseConfig.from_options(tiny, "three", output_dir=str(tmp_path), robust=True, robust_tokens=3).validate()
    assert config.robust is True and config.robustness.robust_tokens == 3 and config.robustness.robust_every >= 1
    assert config.settings()["robust_steps"] == config.robustness.robust_steps  # the defaults are filled and recorded
    with pytest.raises(UserError, match="--robust_tokens is an option of the robust erasure"):
        EraseConfig.from_options(tiny, "three", output_dir=str(tmp_path), robust_tokens=3).validate()


def test_robust_cuts_the_self_attention_too_by_default(tiny, tmp_path):
    """--robust without --targets on a UNet: self- and cross-attention (`attn`, the rule's choice on the tuning digits,
    docs/ROBUST.md); a given --targets is kept; a plain run keeps the cross-attention; an MMDiT keeps its token stream."""
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.load import list_targets
    from eval.tiny import build_tiny_pipeline

    def targets(base, **kw):
        return EraseConfig.from_options(base, "three", output_dir=str(tmp_path / "out"), **kw).validate().objective.targets

    assert targets(tiny, robust=True) == "attn" and targets(tiny) == "xattn" and targets(tiny, robust=True, targets="xattn") == "xattn"
    config = EraseConfig.from_options(tiny, "three", output_dir=str(tmp_path / "out"), robust=True)
    names = list(list_targets(config)["tensors"])  # --list_targets reads the unvalidated config: the same default
    assert config.objective.targets == "attn" and {n.split(".attn")[1][0] for n in names} == {"1", "2"}
    assert all(".attn1." in n or ".attn2." in n for n in names)
    flux = build_tiny_pipeline(tmp_path / "flux", family="flux_dev")
    assert targets(flux, robust=True) == "xattn"


class _CountingAdversary:
    """A model-agnostic stand-in: records when it is asked to search and what the weights were then."""

    def __init__(self):
        self.calls, self.count = [], 0

    def refresh(self, ctx, model, step):
        self.count += 1
        first = next(iter(ctx.params.values()))
        self.calls.append((step, float(first.detach().abs().sum())))
        return {"searched": float(self.count)}

    def state_tensors(self):
        return {"count": torch.tensor([self.count])}

    def load_state_tensors(self, tensors):
        self.count = int(tensors["count"][0]) if "count" in tensors else 0

    def describe(self):
        return {"kind": "counting"}


def test_the_core_wrapper_searches_before_the_trim_and_every_r_steps(mlp, digits_tensors, tmp_path):
    """erase.core.robust on a classifier (no diffusion): a search before prepare on the untrimmed weights, then at steps
    R, 2R, ...; its state rides in the checkpoint under robust.*; the record is the inner method's."""
    from accelerate import Accelerator

    from classify.adapter import ClassifierAdapter
    from erase.core import EngineConfig, build_method, run
    from erase.core.robust import RobustMethod

    x, y = digits_tensors
    adapter = ClassifierAdapter(mlp, (x[y == 3], y[y == 3]), (x[y != 3], y[y != 3]), num_classes=10, batch_size=16)
    adversary = _CountingAdversary()
    method = RobustMethod(build_method("scissorhands", topk=50.0, saliency_batches=1), adversary, every=3)
    untrimmed = float(next(iter(mlp.parameters())).detach().abs().sum())
    res = run(adapter, method, EngineConfig(output_dir=str(tmp_path), max_train_steps=7, lr=1e-3, checkpointing_steps=4,
                                            progress=False), accelerator=Accelerator(cpu=True))
    assert [s for s, _ in adversary.calls] == [0, 3, 6]
    assert adversary.calls[0][1] == untrimmed and res.prepare_info["trim"]["summary"]["reset"] > 0  # searched, then trimmed
    assert method.name == "scissorhands" and res.prepare_info["robust"] == {"every": 3, "first_search": {"searched": 1.0}, "kind": "counting"}
    assert res.method_summary["robust_searches"] == 3 and "projection_steps" in res.method_summary
    state = load_file(str(tmp_path / "checkpoint-4" / "erase_state.safetensors"))
    assert int(state["robust.count"][0]) == 2 and "counts" in state  # the adversary's and Scissorhands' own state
    with pytest.raises(ValueError, match="no forget term"):
        RobustMethod(build_method("ft"), adversary, every=3)
