"""NudeNet scores an audit's images as generation writes them (eval.nudity_live): the same detections as scoring the
files, no image decoded twice, and what the hand-over cannot vouch for left to the folder's scoring."""

import io
import json

import numpy as np
import pytest
from eval_fixtures import draw_torso, safe_images

from eval import nudity
from eval.nudity_live import LiveDetection


def _handed_over(folder, images):
    """Write each RGB array as generation does (PNG bytes, then the file) and return what its writer hands over."""
    from PIL import Image

    folder.mkdir()
    saved = []
    for name, rgb in images.items():
        image, buf = Image.fromarray(rgb), io.BytesIO()
        image.save(buf, format="PNG")
        (folder / name).write_bytes(buf.getvalue())
        saved.append((name, buf.getvalue(), image))
    return saved


def test_handed_over_images_score_as_their_files_and_are_never_decoded(tmp_path, monkeypatch):
    images = {"00000_0.png": draw_torso(256), **{f"{k}.png": v for k, v in safe_images().items()},
              "blank.png": np.full((64, 64, 3), 7, np.uint8)}
    saved = _handed_over(tmp_path / "images", images)
    paths = [tmp_path / "images" / name for name in images]
    out = tmp_path / "audit"
    with LiveDetection(out, batch_size=2) as live:  # one full batch inside the call, the short rest on leaving
        live(saved[:3])
        live(saved[3:])
    assert live.scored == 3  # the blank one is left to the folder's scoring
    lines = [json.loads(x) for x in (out / "raw" / "part-0.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == ["00000_0.png", "cat.png", "face.png"]

    decoded = []
    real = nudity._decode
    monkeypatch.setattr(nudity, "_decode", lambda data: decoded.append(data) or real(data))
    raw, skipped, _ = nudity.score_images(paths, out)
    assert len(decoded) == 1 and skipped == [{"file": "blank.png", "reason": nudity.BLANK_REASON}]
    fresh, fresh_skipped, _ = nudity.score_images(paths, tmp_path / "fresh")  # every file decoded and scored
    assert raw == fresh and skipped == fresh_skipped
    assert {d["class"] for d in raw["00000_0.png"]} >= {"FEMALE_BREAST_EXPOSED"} and raw["cat.png"] == []
    assert len((out / "raw" / "part-0.jsonl").read_text().splitlines()) == 3  # nothing scored twice


@pytest.mark.parametrize("shape", [(96, 96), (64, 150), (150, 64)])
def test_letterboxing_rgb_pixels_equals_nudenets_own_on_the_decoded_file(shape):
    import cv2

    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])
    blob, meta = nudity.preprocess(cv2.imdecode(png, cv2.IMREAD_COLOR))  # NudeNet's _read_image on the file's BGR
    ours, our_meta = nudity.preprocess_rgb(rgb)
    assert ok and np.array_equal(ours, blob) and our_meta == list(meta)


def test_what_cannot_be_vouched_for_is_left_to_the_files(tmp_path):
    from PIL import Image

    saved = _handed_over(tmp_path / "images", {"grey.png": draw_torso(128)[..., 0]})  # mode L: not RGB
    assert Image.open(tmp_path / "images" / "grey.png").mode == "L"
    with LiveDetection(tmp_path / "audit") as live:
        live(saved)
    assert live.scored == 0 and (tmp_path / "audit" / "raw" / "part-0.jsonl").read_text() == ""


def test_an_error_inside_generation_writes_no_partial_batch(tmp_path):
    saved = _handed_over(tmp_path / "images", {"00000_0.png": draw_torso(128)})
    with pytest.raises(RuntimeError, match="generation failed"):
        with LiveDetection(tmp_path / "audit") as live:
            live(saved)
            raise RuntimeError("generation failed")
    assert (tmp_path / "audit" / "raw" / "part-0.jsonl").read_text() == ""  # the folder's scoring does it on rerun
