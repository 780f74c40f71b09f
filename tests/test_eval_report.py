import json
import re

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


HOSTILE = "<script>alert(1)</script> | *x* [link](javascript:alert(1)) `code` ![img](http://x/y.png)"


def _leaves(obj, path=()):
    """(path, value) of every leaf of a JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, obj


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _summary_with_protocol(audits):
    from eval.protocols import get_protocol, record

    summary = json.loads((audits[0] / "summary.json").read_text())
    summary["settings"]["protocol"] = record(get_protocol("i2p-sexual"))
    summary["settings"]["generation"] = {"model": "m", "steps": 3, "guidance": "row", "scheduler": "lms"}
    summary["skipped"] = [{"file": "x.png", "reason": "blank image"}]
    summary["blank_images"] = 1
    return summary


def test_every_text_field_of_a_summary_reaches_the_report_inert(audits, tmp_path):
    """Whatever string a summary.json holds, in any field the report shows, report.md gets it escaped."""
    summary = _summary_with_protocol(audits)
    texts = [p for p, v in _leaves(summary) if isinstance(v, str)]
    assert len(texts) > 20  # the protocol record, settings, generation settings, skipped files
    bad = json.loads(json.dumps(summary))
    for path in texts:
        _set(bad, path, HOSTILE)
    bad["counts"] = {HOSTILE: 1, **summary["counts"]}
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(bad))
    report.write_report([folder], tmp_path / "r", names=[HOSTILE])
    md = (tmp_path / "r" / "report.md").read_text()
    assert HOSTILE not in md and "&lt;script&gt;" in md
    ours = {"![detections per class](counts.png)", "![image grid](grid.png)"}
    text = "\n".join(line for line in md.splitlines() if line not in ours)
    assert "<" not in text and not re.search(r"(?<!\\)[\]`*]", text.replace("**", ""))  # no live link, code or emphasis
    assert all(line.count("|") - line.count("\\|") == 3 for line in md.splitlines() if line.startswith("| "))


NOT_COUNTS = ["3", -1, 1.5, True, None, float("nan"), float("inf"), [2], {"n": 2}]


@pytest.mark.parametrize("field", ["images", "flagged_images", "blank_images", ("counts", "FEMALE_BREAST_EXPOSED"),
                                   ("settings", "protocol", "table_rows")])
@pytest.mark.parametrize("value", NOT_COUNTS, ids=repr)
def test_a_count_that_is_not_a_count_is_one_line_naming_it(audits, tmp_path, field, value):
    summary = _summary_with_protocol(audits)
    path = field if isinstance(field, tuple) else (field,)
    _set(summary, path, value)
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))  # NaN and Infinity are what json writes for them
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as err:
        report.main(report.parse_args([str(folder), "--output_dir", str(out)]))
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message and path[-1] in message and "non-negative integer" in message
    assert not out.exists()


@pytest.mark.parametrize("change, words", [
    ({"flagged_images": 3, "images": 2}, "at most images (2)"),
    ({"counts": [1, 2]}, "an object of class -> count"),
    ({"settings": "x"}, "settings = 'x'"),
    ({"skipped": "none"}, "skipped = 'none'"),
    ({"settings": {"protocol": {"name": "p", "table_rows": 4, "threshold": "0.6"}}}, "settings.protocol.threshold"),
    ({"settings": {"protocol": {"name": "p", "table_rows": 4, "threshold": 1.5}}}, "a number in [0, 1]"),
    ({"settings": {"protocol": ["p"]}}, "null or an object with a name"),
    ({"settings": {"generation": "m"}}, "settings.generation"),
])
def test_malformed_summaries_are_one_line(audits, tmp_path, change, words):
    summary = {**json.loads((audits[0] / "summary.json").read_text()), **change}
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError) as err:
        report.write_report([folder], tmp_path / "r")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_an_audit_of_no_image_has_no_rate(audits, tmp_path):
    summary = {**json.loads((audits[0] / "summary.json").read_text()), "images": 0, "flagged_images": 0}
    summary["counts"] = {k: 0 for k in summary["counts"]}
    folder = tmp_path / "none"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    numbers = report.write_report([folder], tmp_path / "r", names=["none"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| **flagged rate** | – |" in md and "inf" not in md and numbers["none"]["flagged_rate"] is None
