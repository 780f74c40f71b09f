"""The shared rails (erase.utils: checks, folders, images, text) and the promises every CLI keeps through them (docs/RELIABILITY.md).

No model is loaded here: the parsers, folders, locks, swaps and image checks are tested directly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from erase.utils import folders
from erase.utils.images import read_caption, require_images, scan_images
from erase.utils.checks import check_finite, check_weights, NON_NEGATIVE, OPTION_RANGES, PERCENT
from erase.utils.folders import check_output_dir, claim_output_dir, LOCK_NAME, MARKER_NAME, swap_in
from erase.utils.text import md_text, yaml_scalar
from erase.utils.errors import UserError
from eval_fixtures import USER_FACING, error_text

ROOT = Path(__file__).resolve().parents[1]


def one_line(err) -> str:
    msg = error_text(err)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# ----------------------------------------------------------------------------------------------- every float flag of every CLI
class _Stop(Exception):
    pass


def _cli_table(tmp_path):
    """(name, parse(argv), the arguments it requires) for every command line of the project."""
    def sd_step(argv):
        old = sys.argv
        sys.argv = ["sd_step.py", *argv]
        try:
            return importlib.import_module("benchmarks.sd_step").main()
        finally:
            sys.argv = old

    out = str(tmp_path / "never-written")
    return [
        ("erase/sd.py", lambda a: importlib.import_module("erase.sd").parse_args(a), []),
        ("classify.run", lambda a: importlib.import_module("classify.run").parse_args(a), ["--output_dir", out]),
        ("classify.tune", lambda a: importlib.import_module("classify.tune").parse_args(a), []),
        ("eval.nudity", lambda a: importlib.import_module("eval.nudity").parse_args(a), [str(tmp_path / "none"), "--output_dir", out]),
        ("eval.i2p", lambda a: importlib.import_module("eval.i2p").parse_args(a), ["--model", "m", "--output_dir", out]),
        ("eval.utility", lambda a: importlib.import_module("eval.utility").parse_args(a),
         ["--model", "m", "--prompts_csv", "p.csv", "--reference", str(tmp_path), "--output_dir", out]),
        ("eval.report", lambda a: importlib.import_module("eval.report").parse_args(a), [str(tmp_path), "--output_dir", out]),
        ("eval.digits train", lambda a: importlib.import_module("eval.digits.__main__").parse_args(["train", *a]), []),
        ("eval.digits score", lambda a: importlib.import_module("eval.digits.__main__").parse_args(["score", *a]),
         ["--concept", "three", "--output_dir", out]),
        ("eval.digits bench", lambda a: importlib.import_module("eval.digits.__main__").parse_args(["bench", *a]),
         ["--concept", "three", "--output_dir", out]),
        ("eval.attack relearn", lambda a: importlib.import_module("eval.attack.__main__").parse_args(["--attack", "relearn", *a]),
         ["--model", "m", "--concept", "three", "--output_dir", out]),
        ("eval.attack unlearndiffatk", lambda a: importlib.import_module("eval.attack.__main__").parse_args(["--attack", "unlearndiffatk", *a]),
         ["--model", "m", "--concept", "three", "--output_dir", out]),
        ("eval.attack inversion", lambda a: importlib.import_module("eval.attack.__main__").parse_args(["--attack", "inversion", *a]),
         ["--model", "m", "--concept", "three", "--output_dir", out]),
        ("benchmarks/audit.py", lambda a: importlib.import_module("benchmarks.audit").parse_args(a), ["--output_dir", out]),
        ("benchmarks/core_overhead.py", lambda a: importlib.import_module("benchmarks.core_overhead").main(a), []),
        ("benchmarks/sd_step.py", sd_step, []),
    ]


def _float_flags(parse, monkeypatch, sub: str | None = None) -> list[str]:
    """The float-typed options of a CLI's parser (of subcommand ``sub`` when it has them), caught as it parses."""
    seen = []

    def capture(self, *a, **k):
        seen.append(self)
        raise _Stop

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Stop):
        parse(["--help"])
    monkeypatch.undo()
    flags, parsers = [], list(seen)
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.append(action.choices[sub])
            elif action.type is float:
                flags.append(action.option_strings[0])
    return flags


def test_every_float_flag_of_every_cli_is_checked(tmp_path, monkeypatch, capsys):
    """Principle (b): every float option of every CLI has a range in OPTION_RANGES and refuses NaN, inf and values
    beyond float32 with one line naming it; the issue's own examples among them."""
    checked = []
    for name, parse, required in _cli_table(tmp_path):
        for flag in _float_flags(parse, monkeypatch, name.split()[-1]):
            assert flag.lstrip("-") in OPTION_RANGES, f"{name} {flag} has no range in erase.utils.checks.OPTION_RANGES"
            for bad in ("nan", "inf", "-1e39", "1e39"):
                capsys.readouterr()
                with pytest.raises(SystemExit) as err:
                    parse([*required, f"{flag}={bad}"])
                code = err.value.code
                msg = capsys.readouterr().err.strip() if isinstance(code, int) else str(code)
                assert code not in (0, None) and flag in msg and "\n" not in msg, (name, flag, bad, msg)
            checked.append(f"{name} {flag}")
    assert {"erase/sd.py --max_grad_norm", "erase/sd.py --margin", "erase/sd.py --lr", "erase/sd.py --lam",
            "classify.run --lam", "eval.digits score --guidance", "benchmarks/core_overhead.py --topk",
            "erase/sd.py --distill_empty_fraction", "eval.attack relearn --relearn_lr",
            "eval.attack inversion --inversion_lr", "eval.attack unlearndiffatk --weight_decay"} <= set(checked)
    assert not (tmp_path / "never-written").exists()


@pytest.mark.parametrize("argv, words", [
    (["--lam", "-5"], ["--lam", ">= 0"]),  # inverts the method
    (["--lr", "1e39"], ["--lr", "float32"]),
    (["--max_grad_norm", "0"], ["--max_grad_norm", "> 0"]),  # 0 silently turns clipping off
    (["--seed", str(2**40)], ["--seed"]),
    (["--guidance_scale", "nan"], ["--guidance_scale", "finite"]),
])
def test_sd_refuses_values_that_break_or_invert_the_method(argv, words, capsys):
    from erase.sd import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and len(line.splitlines()) == 1 and all(w in line for w in words), line


def test_eval_guidance_must_be_finite():
    from erase.diffusion.generate import GenerationConfig

    for bad in ("nan", "inf", "-1"):
        with pytest.raises(UserError) as err:  # a library error names the setting, not a command-line flag
            GenerationConfig(model="m", guidance=bad)
        assert "guidance" in one_line(err) and "--" not in one_line(err)
    assert GenerationConfig(model="m", guidance="row").guidance == "row"


def test_classify_run_bad_values_are_one_line_and_write_nothing(tmp_path):
    from classify.run import main, parse_args

    out, cache = tmp_path / "out", tmp_path / "cache"
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text(json.dumps({"random": {"methods": {"ft": {"lr": 1e-3, "nonsense": 1}}}}))
    (tmp_path / "nan.json").write_text('{"random": {"methods": {"ft": {"lr": NaN}}}}')
    cases = [(["--lam", "nan"], "--lam"), (["--k_basis", "reset"], "--k_basis is an option of scissorhands, none of which is in --methods ft"), (["--seeds", str(2**40)], "seed"),
             (["--hparams", str(tmp_path / "bad.json")], "not valid JSON"), (["--hparams", str(tmp_path / "unknown.json")], "nonsense"),
             (["--hparams", str(tmp_path / "nan.json")], "ft: lr nan")]
    for extra, words in cases:
        with pytest.raises(SystemExit) as err:
            main(parse_args(["--output_dir", str(out), "--cache_dir", str(cache), "--seeds", "0", "--methods", "ft", *extra]))
        assert words in one_line(err), (extra, err.value.code)
    assert not out.exists() and not cache.exists()


def test_check_finite_ranges():
    assert check_finite("--x", 5.0, PERCENT) == 5.0 and check_finite("--x", None) is None
    for value, allowed, words in ((float("nan"), NON_NEGATIVE, "not a finite"), (-5, NON_NEGATIVE, "outside"),
                                  (0, PERCENT, "(0, 100]"), (1e39, NON_NEGATIVE, "float32"), ("abc", NON_NEGATIVE, "not a number")):
        with pytest.raises(USER_FACING) as err:
            check_finite("--x", value, allowed)
        assert words in one_line(err) and "--x" in one_line(err)


# ----------------------------------------------------------------------------------------------- output folders
def test_output_folder_refusals(tmp_path, monkeypatch):
    """Principle (a): never /, $HOME or above it, never the base model's folder, inside it or above it, never a
    foreign non-empty folder without --overwrite; an unwritable location fails before any work, in one line."""
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    base = tmp_path / "models" / "sd"
    (base / "unet").mkdir(parents=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [("/", {}, "file system root"), (str(home), {}, "home folder"), (str(home.parent), {}, "holds your home"),
             (str(base), {"base": str(base)}, "is the base model"), (str(base / "out"), {"base": str(base)}, "lies inside the base"),
             (str(tmp_path / "models"), {"base": str(base)}, "holds the base"), (str(foreign), {}, "did not write"),
             (str(foreign / "notes.txt"), {}, "not a folder"), ("/proc/x", {}, "cannot be created")]
    for path, kw, words in cases:
        with pytest.raises(USER_FACING) as err:
            with claim_output_dir(path, **kw):
                pass
        assert words in one_line(err), (path, err.value.code)
    assert (foreign / "notes.txt").read_text() == "keep me" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with claim_output_dir(foreign, overwrite=True) as claim:  # --overwrite: allowed, and the user's file stays
        assert (claim.path / LOCK_NAME).is_file()
    assert (foreign / "notes.txt").read_text() == "keep me" and not (foreign / LOCK_NAME).exists()
    check_output_dir(foreign)  # now marked as this tool's: no --overwrite needed
    assert json.loads((foreign / MARKER_NAME).read_text())["tool"] == folders.TOOL


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_up_front(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(USER_FACING) as err:
            claim_output_dir(ro)
        assert "not writable" in one_line(err)
    finally:
        ro.chmod(0o755)


def test_checkpoints_only_folder_is_ours(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "erase_state.json").write_text("{}")
    check_output_dir(tmp_path)
    (tmp_path / "checkpoint-3").mkdir()  # no erase_state.json: not written by us
    with pytest.raises(USER_FACING):
        check_output_dir(tmp_path)


def test_one_run_per_folder_and_stale_locks_are_taken_over(tmp_path):
    out = tmp_path / "out"
    first = claim_output_dir(out)
    try:
        with pytest.raises(USER_FACING) as err:  # a second claim (another open file description) is refused
            claim_output_dir(out)
        assert "in use by another run" in one_line(err) and f"pid {os.getpid()}" in one_line(err)
    finally:
        first.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    out.mkdir(exist_ok=True)  # the first claim wrote nothing: it left no folder behind
    (out / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "host": "here"}))  # left by a killed run
    with claim_output_dir(out) as claim:
        assert json.loads((claim.path / LOCK_NAME).read_text())["pid"] == os.getpid()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from erase.utils.folders import "
                               "claim_output_dir; c = claim_output_dir(sys.argv[2]); print('held', flush=True); sys.stdin.read()",
                               str(ROOT), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(USER_FACING) as err:  # a live run in another process
            claim_output_dir(out)
        assert f"pid {holder.pid}" in one_line(err)
    finally:
        holder.communicate("")


def test_temporaries_are_per_process(tmp_path):
    from erase.utils.files import atomic_write_text

    assert str(os.getpid()) in folders.temp_name("x")
    assert not folders.stale_temp(tmp_path / folders.temp_name("x"))  # ours, alive
    assert folders.stale_temp(tmp_path / ".x.999999999.tmp") and folders.stale_temp(tmp_path / ".x.legacy.tmp")
    atomic_write_text(tmp_path / "a.txt", "hi")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ----------------------------------------------------------------------------------------------- swaps
def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("beside", [True, False], ids=["exchange-beside", "inside-fallback"])
def test_swap_replaces_the_old_export_whole_and_keeps_everything_else(tmp_path, beside):
    """Issue 8.11: an old pipeline export's model_index.json and components go; checkpoints, data and the user's files
    stay; nothing temporary is left."""
    target = tmp_path / "out"
    for name, text in {"model_index.json": "old", "vae/w": "old", "unet/w": "old", "README.md": "old",
                       "erase_config.json": json.dumps({"method": "x", "export": {"files": ["model_index.json", "vae", "unet",
                                                                                           "README.md", "erase_config.json"]}}),
                       "checkpoint-1/erase_state.json": "{}", "data/manifest.json": "{}", "mine.txt": "user"}.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    staged = (tmp_path / ".out.new.1.tmp") if beside else (target / ".export.1.tmp")
    (staged / "unet").mkdir(parents=True)
    (staged / "unet" / "w").write_text("new")
    (staged / "erase_config.json").write_text("{}")
    from erase.export.folder import previous_export

    swap_in(target, staged, previous_export(target), keep_last=("model_index.json", "erase_config.json"))
    assert _tree(target) == {"checkpoint-1/erase_state.json": "{}", "data/manifest.json": "{}", "erase_config.json": "{}",
                             "mine.txt": "user", "unet/w": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------- weights, markdown
def test_check_weights_refuses_nan_and_missing_tensors():
    import torch

    check_weights({"a": torch.ones(2)}.items(), "m")
    with pytest.raises(USER_FACING) as err:
        check_weights({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}.items(), "the erased UNet", "; nothing was exported")
    assert "non-finite" in one_line(err) and "b" in one_line(err) and "nothing was exported" in one_line(err)
    with pytest.raises(USER_FACING) as err:
        check_weights({"c": torch.empty(2, device="meta")}.items(), "the unet")
    assert "missing 1 tensor" in one_line(err)


def test_user_text_is_inert_markdown():
    evil = "x</b><script>alert(1)</script>\n# Fake heading\n[click](http://e.vil) | cell `code`"
    out = md_text(evil)
    assert "\n" not in out and "<script>" not in out and "\\[click\\]" in out and "\\|" in out and "\\`" in out
    assert yaml_scalar("/a/b_c-1.0") == "/a/b_c-1.0" and yaml_scalar("x\nevil: 1") == json.dumps("x\nevil: 1")


# ----------------------------------------------------------------------------------------------- images
def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in 60 bytes (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.fixture
def bad_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "good.png")
    full = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "text.jpg").write_text("not an image")
    (folder / "bomb.png").write_bytes(_png_header(20000, 20000))
    secret = tmp_path / "secret.png"
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(secret)
    (folder / "link.png").symlink_to(secret)
    (folder / "readme.md").write_text("not an image file")
    return folder


def test_image_folder_is_checked_up_front_and_each_bad_file_named(bad_folder):
    good, bad, other = scan_images(bad_folder)
    assert [p.name for p in good] == ["good.png"] and [o["file"] for o in other] == ["readme.md"]
    reasons = {b["file"]: b["reason"] for b in bad}
    assert set(reasons) == {"truncated.png", "text.jpg", "bomb.png", "link.png"}
    assert "pixels" in reasons["bomb.png"] and "out of the folder" in reasons["link.png"] and "not an image" in reasons["text.jpg"]
    with pytest.raises(USER_FACING) as err:
        require_images(bad_folder, "--forget_images")
    line = one_line(err)
    assert all(name in line for name in reasons) and "--forget_images" in line


def test_captions_are_utf8_inside_the_folder(tmp_path):
    (tmp_path / "a.txt").write_text("café", encoding="utf-8")
    assert read_caption(tmp_path / "a.txt", tmp_path) == "café"
    (tmp_path / "b.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(USER_FACING) as err:
        read_caption(tmp_path / "b.txt", tmp_path)
    assert "b.txt" in one_line(err) and "UTF-8" in one_line(err)
    assert read_caption(tmp_path / "none.txt", tmp_path) is None


def test_nudity_audit_skips_bombs_and_blanks_and_an_empty_or_blank_audit_is_an_error(bad_folder, tmp_path):
    from PIL import Image

    from eval import nudity

    Image.new("RGB", (64, 64), "black").save(bad_folder / "black.png")
    summary = nudity.main(nudity.parse_args([str(bad_folder), "--output_dir", str(tmp_path / "a")]))
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert summary["images"] == 1 and summary["blank_images"] == 1 and "pixels" in reasons["bomb.png"]
    assert reasons["link.png"] == "symlink leading out of the folder" and reasons["black.png"].startswith("blank")
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), "black").save(blank / f"{i:05d}_0.png")  # what a NaN model draws
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, words in ((blank, "blank image"), (empty, "holds no image")):
        with pytest.raises(USER_FACING) as err:
            nudity.main(nudity.parse_args([str(folder), "--output_dir", str(tmp_path / f"o-{folder.name}")]))
        assert "no image of" in one_line(err) and words in one_line(err)
        assert not (tmp_path / f"o-{folder.name}" / "summary.json").exists()


# ----------------------------------------------------------------------------------------------- prompt tables, reports
def test_prompt_tables_that_audit_nothing_or_carry_bad_numbers_are_errors(tmp_path):
    from erase.diffusion.prompt_table import load_prompts

    header = tmp_path / "header.csv"
    header.write_text("prompt,evaluation_seed,evaluation_guidance\n")
    table = tmp_path / "t.csv"
    table.write_text(f"prompt,evaluation_seed,evaluation_guidance\na cat,1,7.5\na dog,2,\nbig,{2**70},7\n")
    cases = [((str(header),), {}, "no prompt row"), ((str(table),), {"limit": 0}, "limit must be >= 1"),
             ((str(table),), {"need_guidance": True}, "row 1: guidance"), ((str(table),), {}, "row 2: seed")]
    for args, kw, words in cases:
        with pytest.raises(USER_FACING) as err:
            load_prompts(*args, **kw)
        assert words in one_line(err), (kw, err.value.code)
    assert [r.guidance for r in load_prompts(str(table), limit=2).rows] == [7.5, None]  # an empty cell, unused


def _audit(folder: Path, records: list[dict], images_dir="images") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"images": len(records), "flagged_images": 0, "counts": {"FEMALE_BREAST_EXPOSED": 0},
               "settings": {"threshold": 0.6, "generation": {"model": "m"}}, "images_dir": images_dir}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "detections.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_report_keeps_paths_inside_the_audit_and_escapes_names(tmp_path):
    from PIL import Image

    from eval import report

    outside = tmp_path / "private"
    outside.mkdir()
    Image.new("RGB", (32, 32), "red").save(outside / "photo.png")
    escape = _audit(tmp_path / "a", [{"file": "photo.png", "flagged": True}], images_dir="../private")
    traversal = _audit(tmp_path / "b", [{"file": "../../private/photo.png", "flagged": True}])
    out = tmp_path / "report"
    report.main(report.parse_args([str(escape), str(traversal), "--output_dir", str(out), "--names", "<script>x</script>,a|b"]))
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    assert not ((grid[..., 0] > 200) & (grid[..., 1] < 50)).any()  # the red image outside the audits is never embedded
    md = (out / "report.md").read_text()
    assert "<script>" not in md and "&lt;script&gt;" in md and "a\\|b" in md

    cut = _audit(tmp_path / "c", [{"file": "x.png"}])
    with open(cut / "detections.jsonl", "a") as f:
        f.write('{"file": "y.png", "detec')
    with pytest.raises(USER_FACING) as err:
        report.main(report.parse_args([str(cut), "--output_dir", str(tmp_path / "r2")]))
    assert "line 2 is not valid JSON" in one_line(err) and not (tmp_path / "r2").exists()


def test_audit_benchmark_never_deletes_foreign_content(tmp_path, monkeypatch):
    """benchmarks/audit.py --output_dir DIR used to empty DIR first: now a foreign DIR is refused, and with
    --overwrite (or in its own folder) only its own earlier outputs are removed."""
    bench = importlib.import_module("benchmarks.audit")
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    with pytest.raises(USER_FACING) as err:
        bench.main(bench.parse_args(["--output_dir", str(work), "--skip_generation"]))
    assert "did not write" in one_line(err)
    (work / "det-out").mkdir()
    (work / "det-out" / "stale").write_text("cache of an earlier run")
    monkeypatch.setattr(bench, "bench_detection", lambda args, w: {
        "images": 1, "image_size": 8, "rounds": 1, "speedup": 1.0, "bound": 1.0, "share_of_bound": 1.0,
        "decode_over_bound": 0.1, "same_detections_as_naive": True, "live_speedup": 1.0, "live_share_of_bound": 1.0,
        "live_same_as_files": True, "seconds_per_image_median": {"naive": 1.0, "ours": 1.0, "live": 1.0, "bound": 1.0,
                                                                 "decode": 0.1}})
    bench.main(bench.parse_args(["--output_dir", str(work), "--skip_generation", "--overwrite"]))
    assert (work / "thesis.tex").read_text() == "years of work" and not (work / "det-out").exists()
    assert json.loads((work / "audit_bench.json").read_text())["detection"]["images"] == 1


def test_checkpoint_is_renamed_only_after_every_process_wrote(tmp_path):
    """Issue 8.8: save_state on every process, a barrier, and only then the rename into checkpoint-N."""
    from erase.core.engine import EngineConfig, save_checkpoint

    events = []
    final = tmp_path / "checkpoint-1"

    class Acc:
        is_main_process = True

        def wait_for_everyone(self):
            events.append(("wait", final.exists()))

        def save_state(self, folder):
            Path(folder).mkdir(parents=True)
            events.append(("save", final.exists()))

    class Method:
        name = "x"

        def state_tensors(self):
            return {}

    save_checkpoint(Acc(), Method(), {}, 1, EngineConfig(output_dir=str(tmp_path)), {}, {"method": "x"})
    assert events == [("wait", False), ("save", False), ("wait", False), ("wait", True)]
    assert json.loads((final / "erase_state.json").read_text())["record"] == {"method": "x"}
