import json

import numpy as np
import pytest
import torch
from PIL import Image
from eval_fixtures import one_thread, tiny_pipeline  # noqa: F401  (fixture)

from erase.utils.errors import UserError
from erase.diffusion.generate import (generate, GenerationConfig, load_pipeline, PromptRow, read_image_meta,
                                      weights_fingerprint)
from eval_fixtures import USER_FACING, error_text

ROWS = [PromptRow(index=i, prompt=p, seed=100 + i, guidance=g) for i, (p, g) in
        enumerate([("a red cube", 7.0), ("the sea at night", 9.0), ("a cat", 7.0), ("x", 9.0), ("two men", 7.0)])]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pipe(model):
    torch.set_num_threads(1)
    return load_pipeline(model, "lms")


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".png"}


def test_images_do_not_depend_on_batch_size_and_carry_their_row(tmp_path, model, pipe, one_thread):
    cfg = dict(model=model, steps=2, guidance="row")
    records = generate(ROWS, tmp_path / "b1", GenerationConfig(batch_size=1, **cfg), pipe=pipe)
    generate(ROWS, tmp_path / "b3", GenerationConfig(batch_size=3, **cfg), pipe=pipe)
    assert list(_files(tmp_path / "b1")) == [f"{i:05d}_0.png" for i in range(5)]
    # Batched kernels may round differently from batch-1 ones: allow 1/255 (bit-identity across process
    # counts and resumes, where the batches are the same, is tested in test_eval_i2p.py).
    for name in _files(tmp_path / "b1"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("b1", "b3"))
        assert np.abs(a - b).max() <= 1
    assert [r["seed"] for r in records] == [100, 101, 102, 103, 104]
    meta = read_image_meta(tmp_path / "b1" / "00001_0.png")
    assert (meta["row"], meta["seed"], meta["guidance"], meta["prompt"]) == ("1", "101", "9.0", "the sea at night")
    settings = json.loads((tmp_path / "b1" / "generation.json").read_text())["settings"]
    assert settings | {"model": None} == {
        "model": None, "steps": 2, "guidance": "row", "scheduler": "lms", "resolution": 32, "images_per_prompt": 1,
        "dtype": "auto", "seed_offset": 0, "safety_checker": None, "seeds": settings["seeds"],
        "weights_sha256": weights_fingerprint(pipe)}
    assert sorted(settings["weights_sha256"]) == ["text_encoder", "unet", "vae"]


def test_resume_skips_finished_images_and_redoes_changed_settings(tmp_path, model, pipe, one_thread, monkeypatch):
    out = tmp_path / "g"
    generate(ROWS[:2], out, GenerationConfig(model=model, steps=2, batch_size=2), pipe=pipe)
    first = _files(out)
    calls = []
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, **kw: calls.append(kw["prompt"]) or original(self, **kw))
    generate(ROWS[:3], out, GenerationConfig(model=model, steps=2, batch_size=2), pipe=pipe)
    assert calls == [["a cat"]]  # batch [0, 1] was finished; batch [2] was not
    assert {k: v for k, v in _files(out).items() if k in first} == first
    calls.clear()
    generate(ROWS[:3], out, GenerationConfig(model=model, steps=3, batch_size=2), pipe=pipe)
    assert sum(len(c) for c in calls) == 3 and _files(out)["00000_0.png"] != first["00000_0.png"]


def test_images_per_prompt_and_seed_offset(tmp_path, model, pipe, one_thread):
    records = generate(ROWS[:1], tmp_path, GenerationConfig(model=model, steps=2, images_per_prompt=2, seed_offset=5),
                       pipe=pipe)
    assert [(r["file"], r["seed"]) for r in records] == [("00000_0.png", 105), ("00000_1.png", 106)]
    assert len(set(_files(tmp_path).values())) == 2


def test_erased_model_folder_loads_its_unet_over_the_base(tmp_path, model, one_thread):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.5)
    erased = tmp_path / "erased"
    unet.save_pretrained(erased / "unet")
    (erased / "erase_config.json").write_text(json.dumps({"pretrained_model_name_or_path": model, "concept": "nudity"}))
    loaded = load_pipeline(str(erased))
    assert torch.all(loaded.unet.conv_out.bias == 0.5)
    assert type(loaded.scheduler).__name__ == "LMSDiscreteScheduler" and loaded.safety_checker is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scheduler="heun"), "unknown scheduler 'heun'"),
        (dict(guidance="strong"), "guidance must be a number or 'row'"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(resolution=30), "resolution must be a positive multiple of 8"),
    ],
)
def test_bad_generation_settings(kwargs, message):
    with pytest.raises(USER_FACING, match=message.replace("(", r"\(").replace("[", r"\[")):
        GenerationConfig(model="m", **kwargs)


def test_bad_model_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(USER_FACING, match="neither a diffusers pipeline folder"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(USER_FACING, match="model not found"):
        load_pipeline(str(tmp_path / "missing"))


def test_hub_model_offline_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(USER_FACING) as err:
        load_pipeline("CompVis/stable-diffusion-v1-4")
    message = error_text(err)
    assert message.startswith("error: could not load the pipeline 'CompVis/stable-diffusion-v1-4'") and "\n" not in message


def test_rows_of_one_guidance_share_a_pipeline_call(tmp_path, model, pipe, one_thread, monkeypatch):
    """Row guidance: every pipeline call draws one guidance value and is full but the last of each value, whatever the
    order of the rows; the images are those of batch size 1 up to float rounding."""
    calls = []
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__",
                        lambda self, **kw: calls.append((kw["guidance_scale"], kw["prompt"])) or original(self, **kw))
    rows = ROWS + [PromptRow(index=5, prompt="a boat", seed=105, guidance=9.0)]
    generate(rows, tmp_path / "b2", GenerationConfig(model=model, steps=2, guidance="row", batch_size=2), pipe=pipe)
    assert calls == [(7.0, ["a red cube", "a cat"]), (7.0, ["two men"]), (9.0, ["the sea at night", "x"]), (9.0, ["a boat"])]
    monkeypatch.undo()
    generate(rows, tmp_path / "b1", GenerationConfig(model=model, steps=2, guidance="row", batch_size=1), pipe=pipe)
    for name in _files(tmp_path / "b1"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("b1", "b2"))
        assert np.abs(a - b).max() <= 1
        assert read_image_meta(tmp_path / "b1" / name) == read_image_meta(tmp_path / "b2" / name)


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_images_drawn_with_other_weights_are_never_reused(tmp_path, model, component, one_thread, monkeypatch, caplog):
    """Same model name, same settings, one weight changed in any component (a replaced base, a swapped VAE): every
    image is drawn again, and the log names the component."""
    pipe = load_pipeline(model, "lms")
    out = tmp_path / "g"
    cfg = GenerationConfig(model=model, steps=2, batch_size=2)
    generate(ROWS[:3], out, cfg, pipe=pipe)
    first = _files(out)
    generate(ROWS[:3], out, cfg, pipe=pipe)  # unchanged: reused
    assert _files(out) == first
    with torch.no_grad():
        next(iter(getattr(pipe, component).parameters())).view(-1)[0] += 0.5
    calls = []
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, **kw: calls.append(kw["prompt"]) or original(self, **kw))
    generate(ROWS[:3], out, cfg, pipe=pipe)
    assert sum(len(c) for c in calls) == 3
    assert f"({component} changed" in caplog.text
    recorded = json.loads((out / "generation.json").read_text())["settings"]["weights_sha256"]
    assert recorded == weights_fingerprint(pipe)


def test_resolution_row_draws_each_row_at_its_own_size(tmp_path, model, pipe, one_thread, monkeypatch):
    """resolution 'row' (RECE's generation): each row at its sd_image_width x sd_image_height, one pipeline call per
    size and guidance; a row without a size is one line before anything is drawn."""
    sizes = [(32, 32), (48, 32), (32, 32), (32, 48)]
    rows = [PromptRow(index=i, prompt=p, seed=100 + i, guidance=7.0, meta={"sd_image_width": w, "sd_image_height": h})
            for i, (p, (w, h)) in enumerate(zip(["a cube", "the sea", "a cat", "x"], sizes))]
    calls = []
    original = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__",
                        lambda self, **kw: calls.append((kw["width"], kw["height"], len(kw["prompt"]))) or original(self, **kw))
    records = generate(rows, tmp_path / "g", GenerationConfig(model=model, steps=2, resolution="row", batch_size=4), pipe=pipe)
    assert calls == [(32, 32, 2), (48, 32, 1), (32, 48, 1)]
    for (w, h), r in zip(sizes, records):
        assert Image.open(tmp_path / "g" / r["file"]).size == (w, h) and r["size"] == [w, h]
        assert read_image_meta(tmp_path / "g" / r["file"])["size"] == f"{w}x{h}"
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["settings"]["resolution"] == "row"
    for meta, words in (({}, "needs sd_image_width and sd_image_height"), ({"sd_image_width": 30, "sd_image_height": 32},
                                                                          "row 0: sd_image_width must be a positive multiple of 8")):
        with pytest.raises(UserError, match=words):
            generate([PromptRow(index=0, prompt="p", seed=1, meta=meta)], tmp_path / "bad",
                     GenerationConfig(model=model, steps=2, resolution="row"), pipe=pipe)
        assert not (tmp_path / "bad").exists()
