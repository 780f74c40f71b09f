"""``from eval import audit``: the I2P audit in one call, on a folder or a loaded pipeline, checked like the CLI."""

import json

import pytest
from eval_fixtures import DATA, fresh_accelerate, one_thread, tiny_pipeline  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not (DATA / "i2p.csv").exists(), reason="../shared/data not present")
OPTIONS = dict(prompts_csv=str(DATA / "i2p.csv"), subset="sexual", limit=2, steps=2, batch_size=2, guidance="row",
               no_report=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("models"))


def test_audit_of_a_folder_returns_the_summary_it_wrote(model, tmp_path, one_thread, fresh_accelerate):
    from eval import audit

    summary = audit(model, output_dir=str(tmp_path / "a"), **OPTIONS)
    assert summary == json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["images"] == 2 and summary["settings"]["threshold"] == 0.6
    assert summary["settings"]["nudenet_version"] == "3.4.2" and summary["settings"]["protocol"] is None
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 2


def test_a_loaded_pipeline_gives_the_same_images_as_its_folder(model, tmp_path, one_thread, fresh_accelerate):
    from diffusers import StableDiffusionPipeline

    from eval import audit

    audit(model, output_dir=str(tmp_path / "folder"), **OPTIONS)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    scheduler = type(pipe.scheduler).__name__
    summary = audit(pipe, output_dir=str(tmp_path / "pipe"), **OPTIONS)
    assert type(pipe.scheduler).__name__ == scheduler  # the caller's pipeline keeps its own sampler
    a = sorted((tmp_path / "folder" / "images").glob("*.png"))
    b = sorted((tmp_path / "pipe" / "images").glob("*.png"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    from PIL import Image
    import numpy as np

    for x, y in zip(a, b):  # same pixels; the PNG metadata differs only in the model identity
        assert np.array_equal(np.asarray(Image.open(x)), np.asarray(Image.open(y)))
    generation = json.loads((tmp_path / "pipe" / "images" / "generation.json").read_text())
    assert generation["settings"]["model"] == "in-memory:StableDiffusionPipeline"
    folder = json.loads((tmp_path / "folder" / "images" / "generation.json").read_text())
    assert generation["settings"]["weights_sha256"] == folder["settings"]["weights_sha256"]  # the same weights
    assert summary["images"] == 2


def test_bad_options_are_errors_not_exits(model, tmp_path):
    from eval import audit

    with pytest.raises(TypeError, match="unknown option 'thresh'; allowed: .*threshold"):
        audit(model, output_dir=str(tmp_path / "o"), thresh=0.5)
    with pytest.raises(ValueError, match="threshold"):
        audit(model, output_dir=str(tmp_path / "o"), **{**OPTIONS, "threshold": 1.5})
    with pytest.raises(ValueError, match="--threshold 0.45 contradicts protocol i2p-mace"):
        audit(model, protocol="i2p-mace", output_dir=str(tmp_path / "o"), threshold=0.45)
    with pytest.raises(ValueError, match="not a text-to-image diffusers pipeline"):
        audit(object(), output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_loaded_pipeline_whose_vae_changed_is_drawn_again(model, tmp_path, one_thread, fresh_accelerate):
    import torch
    from diffusers import StableDiffusionPipeline

    from eval import audit

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    out = tmp_path / "pipe"
    audit(pipe, output_dir=str(out), **OPTIONS)
    keys = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    before = json.loads((out / "images" / "generation.json").read_text())["settings"]["weights_sha256"]
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.add_(0.25)
    audit(pipe, output_dir=str(out), **OPTIONS)
    after = json.loads((out / "images" / "generation.json").read_text())["settings"]["weights_sha256"]
    assert after["vae"] != before["vae"] and after["unet"] == before["unet"]
    assert all((out / "images" / name).read_bytes() != data for name, data in keys.items())  # drawn again
