import json

import numpy as np
import pytest
from eval_fixtures import draw_torso, safe_images, save_rgb

from eval import nudity, report
from erase.utils.errors import UserError
from eval_fixtures import USER_FACING


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    """Two audits of the same rows: 'base' shows the torso in row 1, 'erased' a cat there."""
    root = tmp_path_factory.mktemp("audits")
    detector = nudity.NudityDetector(threads=1)
    dirs = []
    for name, row1 in (("base", draw_torso(256)), ("erased", safe_images()["cat"])):
        images = root / name / "images"
        images.mkdir(parents=True)
        save_rgb(images / "00000_0.png", safe_images()["face"])
        save_rgb(images / "00001_0.png", row1)
        files = sorted(images.iterdir())
        raw, skipped, settings = nudity.score_images(files, root / name, detector=detector)
        records, summary = nudity.summarize(files, raw, skipped, settings, 0.25, nudity.CLASS_SETS["exposed"], "exposed")
        summary["images_dir"] = "images"
        nudity.write_outputs(root / name, records, summary)
        dirs.append(root / name)
    return dirs


def test_report_contains_the_numbers_of_its_inputs(audits, tmp_path):
    out = tmp_path / "report"
    numbers = report.main(report.parse_args([*map(str, audits), "--output_dir", str(out)]))
    md = (out / "report.md").read_text()
    assert "| class | base | erased |" in md
    assert "| FEMALE_BREAST_EXPOSED | 2 | 0 |" in md and "| BELLY_EXPOSED | 1 | 0 |" in md
    assert "| **flagged images** | 1 / 2 | 0 / 2 |" in md and "| **flagged rate** | 50.00% | 0.00% |" in md
    assert "| threshold | 0.25 | 0.25 |" in md and "settings differ" not in md
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(numbers))
    assert saved["base"]["counts"]["FEMALE_BREAST_EXPOSED"] == 2 and saved["erased"]["total_detections"] == 0
    from PIL import Image

    assert Image.open(out / "counts.png").size[0] > 300
    grid = Image.open(out / "grid.png")
    assert grid.size == (120 + 2 * 128, 2 * 128)  # rows: audits; columns: the flagged row first, then the other


def test_grid_pixelates_detected_regions_unless_asked_not_to(audits, tmp_path):
    from PIL import Image

    arrays = {}
    for flag in ([], ["--no_pixelate"]):
        out = tmp_path / ("raw" if flag else "pix")
        report.main(report.parse_args([*map(str, audits), "--output_dir", str(out), *flag]))
        arrays[bool(flag)] = np.asarray(Image.open(out / "grid.png"))
    base_flagged_tile = (slice(0, 128), slice(120, 248))
    assert not np.array_equal(arrays[True][base_flagged_tile], arrays[False][base_flagged_tile])
    erased_tiles = (slice(128, 256), slice(120, 376))
    assert np.array_equal(arrays[True][erased_tiles], arrays[False][erased_tiles])  # nothing detected there


def test_differing_settings_are_called_out_and_bad_dirs_fail(audits, tmp_path):
    summary = json.loads((audits[1] / "summary.json").read_text())
    summary["settings"]["threshold"] = 0.6
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(summary))
    report.write_report([audits[0], other], tmp_path / "r", names=["a", "b"])
    assert "settings differ between audits: threshold" in (tmp_path / "r" / "report.md").read_text()
    with pytest.raises(USER_FACING, match="audit summary not found"):
        report.write_report([tmp_path / "nothing"], tmp_path / "r2")
    with pytest.raises(USER_FACING, match="--names has 1 name"):
        report.write_report(audits, tmp_path / "r3", names=["a"])
