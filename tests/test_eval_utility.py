import json

import numpy as np
import pytest
import torch
from eval_fixtures import DATA, fresh_accelerate, one_thread, save_rgb, tiny_clip, tiny_pipeline  # noqa: F401

from eval import utility
from eval_fixtures import USER_FACING


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return tiny_pipeline(root), tiny_clip(root)


def _noise_images(n, seed, size=32):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_clip_score_is_the_clipped_cosine_of_clip_embeddings(models, one_thread):
    model, processor = utility.load_clip(models[1])
    images, prompts = _noise_images(3, 0), ["a cat", "a dog on a red sofa", "x"]
    scores = utility.clip_score(images, prompts, model, processor, batch_size=2)
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0)
    assert np.allclose(scores["per_image"], expected.tolist(), atol=1e-5)
    assert scores["clip_score_x100"] == pytest.approx(100 * expected.mean().item(), abs=1e-3)


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift(models, one_thread):
    clip = utility.load_clip(models[1])
    same = _noise_images(6, 1)
    assert utility.fid(same, same, utility.make_fid_metric("clip", clip)) == pytest.approx(0, abs=1e-2)
    from PIL import Image

    dark = [Image.fromarray((np.asarray(im) // 4).astype(np.uint8)) for im in same]
    assert utility.fid(dark, same, utility.make_fid_metric("clip", clip)) > 0.1
    with pytest.raises(USER_FACING, match="at least 2 images"):
        utility.fid(same[:1], same, utility.make_fid_metric("clip", clip))


def test_inception_features_fail_with_one_clear_line_offline():
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(USER_FACING, match="needs torch-fidelity"):
            utility.make_fid_metric("inception")
    else:  # installed: its weight download must fail offline with one line
        with pytest.raises(USER_FACING, match="Inception-v3 weights"):
            utility.make_fid_metric("inception")


@pytest.mark.skipif(not (DATA / "coco_10k.csv").exists(), reason="../shared/data not present")
def test_utility_cli_end_to_end(tmp_path, models, fresh_accelerate, one_thread):
    reference = tmp_path / "ref"
    reference.mkdir()
    for i, im in enumerate(_noise_images(4, 2)):
        im.save(reference / f"{i}.png")
    (reference / "README.txt").write_text("not an image")
    out = tmp_path / "util"
    args = utility.parse_args(["--model", models[0], "--prompts_csv", str(DATA / "coco_10k.csv"), "--reference",
                               str(reference), "--output_dir", str(out), "--limit", "4", "--steps", "2",
                               "--clip_model", models[1], "--fid_features", "clip"])
    result = utility.main(args)
    saved = json.loads((out / "utility.json").read_text())
    assert saved["images"] == 4 and saved["reference_images"] == 4
    assert saved["reference_skipped"] == [{"file": "README.txt", "reason": "not an image file"}]
    assert 0 <= saved["clip_score"] <= 1 and saved["clip_score_x100"] == pytest.approx(100 * saved["clip_score"])
    assert saved["fid"] == pytest.approx(result["fid"]) and saved["fid"] > 0
    assert saved["settings"]["generation"]["steps"] == 2 and saved["settings"]["generation"]["prompts"] == 4
    with pytest.raises(USER_FACING, match="reference folder not found"):
        utility.parse_args(["--model", "m", "--prompts_csv", "c.csv", "--reference", str(tmp_path / "no"),
                            "--output_dir", str(out)])
