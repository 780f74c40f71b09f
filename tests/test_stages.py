"""The run as a config and stages (erase/diffusion/, docs/ARCHITECTURE.md): both front ends build the same config, one
validation answers both, and each stage runs alone on the tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

SMALL = dict(num_forget_images=2, num_retain_images=2, num_inference_steps=1, generation_batch_size=2, log_every=1,
             saliency_batches=1, lr=1e-3, max_train_steps=1)


def _flags(options: dict) -> list[str]:
    out = []
    for k, v in options.items():
        out += [f"--{k}", str(v)]
    return out


def test_the_command_line_and_the_api_build_the_same_config(tiny, tmp_path):
    from erase.diffusion.config import EraseConfig
    from erase.sd import parse_args

    options = dict(SMALL, topk=5, export_format="diffusers,lora", retain_loss="both", anchor_prompt="a cat")
    cli = parse_args(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", str(tmp_path), *_flags(options)])
    api = EraseConfig.from_options(tiny, "nudity", "scissorhands", str(tmp_path), **{**options, "export_format": ["diffusers", "lora"]})
    api.validate()
    assert cli.settings() == api.settings()
    assert cli.method_options == api.method_options and cli.method_options["topk"] == 5.0
    assert cli.method_options["forget_loss"] == "redirect" and cli.method_options["lam"] == 0.3  # the adapter's defaults, once
    assert cli.lr == cli.train.lr == 1e-3 and cli.topk == 5.0 and cli.mask_ratio is None  # flat reads
    assert api.concept_set.concepts[0].anchor_prompt == "a cat" and api.family.name == "sd1"
    assert not (tmp_path / "erase_config.json").exists()  # building and validating write nothing


@pytest.mark.parametrize("options, words", [
    (dict(lr=float("nan")), "--lr nan is not a finite number"),
    (dict(topk=0), "--topk 0 is outside the allowed range (0, 100]"),
    (dict(method="salun", topk=3), "--topk is not an option of method salun"),
    (dict(resolution=12), "--resolution must be a positive multiple of 8"),
    (dict(export_format="ckpt"), "'ckpt' is not an export format"),
])
def test_one_validation_one_message_for_both_front_ends(tiny, tmp_path, capsys, options, words):
    from erase.diffusion.config import EraseConfig
    from erase.sd import parse_args
    from erase.utils.errors import UserError

    method = options.pop("method", "scissorhands")
    with pytest.raises(UserError) as api:
        EraseConfig.from_options(tiny, "nudity", method, str(tmp_path / "o"), **options).validate()
    with pytest.raises(SystemExit) as cli:
        parse_args(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--method", method, *_flags(options)])
    line = capsys.readouterr().err.strip()
    assert cli.value.code == 2 and line == f"erase/sd.py: error: {api.value}" and words in line


def test_conditioning_runs_alone(tiny):
    """Stage 3 without the engine: tables of two concepts and their encoding through the family's text stack."""
    from erase.diffusion.conditioning import encode, prompt_tables
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.data import EraseData, ImageSet
    from erase.diffusion.families import FAMILIES, load_text

    config = EraseConfig.from_options(tiny, "three,five", output_dir="unused").validate()
    forget = ImageSet("forget", [], ["x"] * 4, concepts=[0, 0, 1, 1])
    data = EraseData(None, forget, None, {}, 32, ["three", "five"])
    tables = prompt_tables(config.concept_set, data)
    three, five = config.concept_set.concepts
    assert tables.forget == three.forget_prompts + five.forget_prompts and tables.image_group == [0, 0, 1, 1]
    assert [tables.anchors[a] for a in tables.group_anchor] == [three.anchor_prompt, five.anchor_prompt]
    emb = encode(tables, load_text(FAMILIES["sd1"], tiny), "cpu")
    assert emb.forget.shape[0] == len(tables.forget) and emb.distill.shape[0] == len(config.concept_set.retain_prompts)
    assert torch.equal(emb.forget[0], emb.forget[0]) and not torch.equal(emb.forget[0], emb.anchor[0])


def _images(folder, n, caption=None):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (30 * i, 90, 10)).save(folder / f"img{i}.png")
    if caption:
        (folder / "img0.txt").write_text(caption)


def test_several_concepts_take_their_forget_images_from_their_own_subfolders(tiny, tmp_path, capsys):
    """With several concepts every user forget image belongs to the concept whose subfolder holds it (before, every
    uncaptioned image went to the first concept); a captioned one is redirected to its own concept's anchor."""
    from erase.diffusion.conditioning import prompt_tables
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.data import EraseData, user_forget_images
    from erase.sd import main, parse_args

    root = tmp_path / "forget"
    _images(root / "three", 2)
    _images(root / "five", 3, caption="a five drawn in red")
    images = user_forget_images(root, ["three", "five"])
    assert images.concept_of() == [0, 0, 1, 1, 1] and images.source == str(root.resolve())
    config = EraseConfig.from_options(tiny, ["three", "five"], output_dir=str(tmp_path / "o"), forget_images=str(root)).validate()
    tables = prompt_tables(config.concept_set, EraseData(None, images, None, {}, 32, ["three", "five"]))
    caption_group = tables.image_group[2]
    assert tables.image_group == [0, 0, caption_group, 1, 1] and tables.forget[tables.groups[caption_group][0]] == "a five drawn in red"
    assert tables.anchors[tables.group_anchor[caption_group]] == config.concept_set.concepts[1].anchor_prompt
    Image.new("RGB", (16, 16)).save(root / "loose.png")
    with pytest.raises(SystemExit) as err:
        main(parse_args(["--pretrained_model_name_or_path", tiny, "--concept", "three,five", "--forget_images", str(root),
                         "--output_dir", str(tmp_path / "o"), "--check"]))
    assert "loose.png" in str(err.value.code) and "subfolder of its concept" in str(err.value.code)


def test_data_prepared_once_serves_several_erasures(tiny, tmp_path):
    """prepare_data for two concepts, then each concept erased from those images: nothing is generated again, and each
    run trains on its own concept's images only."""
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.run import erase, prepare_data

    data_dir = tmp_path / "data"
    both = EraseConfig.from_options(tiny, ["three", "five"], output_dir=str(tmp_path / "prep"), data_dir=str(data_dir), **SMALL)
    data = prepare_data(both.validate())
    assert data.concepts == ["three", "five"] and data.forget.concept_of() == [0, 0, 1, 1]
    files = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.png")}
    for name in ("five", "three"):
        config = EraseConfig.from_options(tiny, name, output_dir=str(tmp_path / name), data_dir=str(data_dir), **SMALL).validate()
        result = erase(config, data=data)
        record = json.loads((tmp_path / name / "erase_config.json").read_text())
        assert record["data"]["forget"]["count"] == 2 and record["concept"] == name
        assert result.record["prepare"]["trim"]["summary"]["reset"] > 0
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*.png")} == files
    with pytest.raises(ValueError, match="no forget images of concept 'eight'"):
        erase(EraseConfig.from_options(tiny, "eight", output_dir=str(tmp_path / "e"), data_dir=str(data_dir), **SMALL), data=data)
