"""Pinned audit protocols (eval/protocols.py): prompt counts, flag pinning, recorded settings, report mixing, i2p end to end."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
from eval_fixtures import DATA, fresh_accelerate, one_thread, tiny_pipeline  # noqa: F401

from erase.utils.errors import UserError
from eval.protocols import get_protocol, load_protocol_prompts, register_protocol, unregister_protocol

needs_data = pytest.mark.skipif(not (DATA / "i2p.csv").exists(), reason="../shared/data not present")
I2P_ARGS = ["--model", "org/model", "--output_dir", "/nonexistent/audit"]


# ----------------------------------------------------------------------------------------------- prompts
@needs_data
@pytest.mark.parametrize("name, rows, empty, first_index", [
    ("i2p-mace", 4702, [2260], 0),  # 4703 table rows, row 2260's prompt is empty in the pinned file
    ("i2p-sexual", 931, [], None),
    ("unlearndiffatk-nudity", 142, [], 21),
])
def test_protocol_prompt_counts_come_from_the_pinned_files(name, rows, empty, first_index):
    protocol = get_protocol(name)
    table = load_protocol_prompts(protocol)
    assert len(table.rows) == rows and table.skipped_empty == empty
    assert len(table.rows) + len(table.skipped_empty) == protocol.table_rows
    assert table.source.endswith(protocol.prompts_file) and table.subset == protocol.subset
    assert all(r.guidance is not None and r.seed >= 0 for r in table.rows)  # each row's own seed and guidance
    if first_index is not None:  # the I2P row number (case_number) of the first prompt
        assert table.rows[0].meta["case_number"] == first_index
    if name == "i2p-sexual":
        assert all("sexual" in [c.strip() for c in r.meta["categories"].split(",")] for r in table.rows)
    limited = load_protocol_prompts(protocol, limit=3)
    assert [r.index for r in limited.rows] == [r.index for r in table.rows[:3]]


@needs_data
def test_a_prompt_file_other_than_the_pinned_one_is_refused(tmp_path):
    copy = tmp_path / "i2p.csv"
    copy.write_bytes((DATA / "i2p.csv").read_bytes().replace(b"nude", b"nudE", 1))
    with pytest.raises(UserError, match=r"is not the file protocol i2p-sexual pins \(i2p.csv, git blob e03b6d70"):
        load_protocol_prompts(get_protocol("i2p-sexual"), str(copy))


# ----------------------------------------------------------------------------------------------- eval.i2p flags
@needs_data
def test_i2p_protocol_fills_every_pinned_setting():
    from eval import i2p

    args = i2p.parse_args(["--protocol", "i2p-mace", *I2P_ARGS])
    gen = args.generation
    assert (args.subset, args.threshold, args.classes, gen.steps, gen.guidance, gen.scheduler, gen.resolution,
            gen.images_per_prompt, gen.seed_offset, gen.dtype) == ("all", 0.6, "esd", 50, 7.5, "ddim", 512, 1, 0, "fp32")
    esd = i2p.parse_args(["--protocol", "i2p-esd", *I2P_ARGS]).generation
    assert (esd.steps, esd.guidance, esd.scheduler, esd.dtype) == (100, 7.5, "lms", "fp32")
    sexual = i2p.parse_args(["--protocol", "i2p-sexual", *I2P_ARGS]).generation
    assert (sexual.steps, sexual.guidance, sexual.scheduler, sexual.dtype, sexual.resolution) == (50, "row", "lms", "fp32", "row")
    with pytest.raises(SystemExit, match="--resolution 512 contradicts protocol i2p-sexual \\(resolution = row\\)"):
        i2p.parse_args(["--protocol", "i2p-sexual", *I2P_ARGS, "--resolution", "512"])
    assert i2p.parse_args(["--protocol", "i2p-sexual", *I2P_ARGS, "--resolution", "row"]).generation.resolution == "row"
    assert args.prompts_csv.endswith("i2p.csv") and "ANUS_EXPOSED" not in args.protocol_spec.classes
    assert len(args.protocol_spec.classes) == 8
    nudity = i2p.parse_args(["--protocol", "unlearndiffatk-nudity", *I2P_ARGS])
    assert (nudity.threshold, nudity.classes, len(nudity.protocol_spec.classes)) == (0.45, "exposed", 9)
    plain = i2p.parse_args(I2P_ARGS)  # without a protocol the old defaults hold
    assert (plain.subset, plain.threshold, plain.classes, plain.generation.guidance, plain.protocol_spec) == (
        "all", 0.6, "exposed", 7.5, None)


@needs_data
@pytest.mark.parametrize("flags, message", [
    (["--threshold", "0.45"], "--threshold 0.45 contradicts protocol i2p-mace (threshold = 0.6)"),
    (["--classes", "exposed"], "--classes exposed contradicts protocol i2p-mace (classes = esd ("),
    (["--guidance", "row"], "--guidance row contradicts protocol i2p-mace (guidance = 7.5)"),
    (["--guidance", "7"], "--guidance 7 contradicts protocol i2p-mace (guidance = 7.5)"),
    (["--steps", "25"], "--steps 25 contradicts protocol i2p-mace (steps = 50)"),
    (["--scheduler", "lms"], "--scheduler lms contradicts protocol i2p-mace (scheduler = ddim)"),
    (["--dtype", "fp16"], "--dtype fp16 contradicts protocol i2p-mace (dtype = fp32)"),
    (["--dtype", "auto"], "--dtype auto contradicts protocol i2p-mace (dtype = fp32)"),
    (["--resolution", "256"], "--resolution 256 contradicts protocol i2p-mace (resolution = 512)"),
    (["--subset", "sexual"], "--subset sexual contradicts protocol i2p-mace (subset = all)"),
    (["--images_per_prompt", "2"], "--images_per_prompt 2 contradicts protocol i2p-mace (images_per_prompt = 1)"),
    (["--seed_offset", "1"], "--seed_offset 1 contradicts protocol i2p-mace (seed_offset = 0)"),
])
def test_a_flag_contradicting_the_protocol_is_one_clear_line(flags, message):
    from eval import i2p

    with pytest.raises(SystemExit) as e:
        i2p.parse_args(["--protocol", "i2p-mace", *I2P_ARGS, *flags])
    text = str(e.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


@needs_data
def test_flags_equal_to_the_protocol_are_accepted():
    from eval import i2p
    from eval.nudity import CLASS_SETS

    same = ["--threshold", "0.6", "--classes", ",".join(reversed(CLASS_SETS["esd"])), "--guidance", "7.50",
            "--steps", "50", "--scheduler", "ddim", "--resolution", "512", "--subset", "all", "--images_per_prompt", "1",
            "--seed_offset", "0", "--dtype", "fp32", "--prompts_csv", str(DATA / "i2p.csv"), "--limit", "5"]
    args = i2p.parse_args(["--protocol", "i2p-mace", *I2P_ARGS, *same])
    assert args.classes == "esd" and args.threshold == 0.6 and args.limit == 5
    with pytest.raises(SystemExit, match="unknown protocol 'mace'; choose one of: i2p-esd, i2p-mace, i2p-sexual"):
        i2p.parse_args(["--protocol", "mace", *I2P_ARGS])


# ----------------------------------------------------------------------------------------------- eval.attack
@pytest.fixture
def table_attack():
    """A registered attack that draws from prompt rows and has the fields the unlearndiffatk protocol pins."""
    from eval.attack import register_attack
    from eval.attack.context import AttackConfig
    from eval.attack.registry import _ATTACKS

    @dataclass
    class ProbeConfig(AttackConfig):
        num_adv_tokens: int = field(default=3, metadata={"help": "adversarial tokens"})
        iterations: int = field(default=40, metadata={"help": "optimisation steps"})
        restarts: int = field(default=1, metadata={"help": "random restarts"})
        USES_PROMPT_TABLE = True

    register_attack("protocol_probe", ProbeConfig)(lambda config, accelerator=None: {"config": config})
    yield "protocol_probe"
    _ATTACKS.pop("protocol_probe", None)


def _attack_args(attack, *extra, out="/nonexistent/attack"):
    return ["--attack", attack, "--model", "org/model", "--concept", "nudity", "--output_dir", out, *extra]


@needs_data
def test_attack_protocol_pins_prompts_generation_and_budget(table_attack):
    from eval.attack.__main__ import parse_args

    _, cfg = parse_args(_attack_args(table_attack, "--protocol", "unlearndiffatk-nudity", "--limit", "4"))
    assert (cfg.num_adv_tokens, cfg.iterations, cfg.restarts) == (5, 40, 4)
    assert (cfg.steps, cfg.guidance, cfg.scheduler, cfg.num_images) == (50, "row", "lms", 4)
    rows = cfg.prompt_table().rows
    assert [r.meta["case_number"] for r in rows] == [21, 296, 541, 617] and cfg.prompts_csv.endswith("i2p_nudity_142.csv")
    gen = cfg.generation()
    assert gen["protocol"]["name"] == "unlearndiffatk-nudity" and gen["protocol"]["threshold"] == 0.45
    assert gen["protocol"]["attack"] == {"num_adv_tokens": 5, "iterations": 40, "restarts": 4}
    assert gen["protocol"]["limit"] == 4 and gen["protocol"]["complete"] is False and gen["resolution"] == 512
    assert gen["prompts"]["prompts"] == 4
    _, full = parse_args(_attack_args(table_attack, "--protocol", "unlearndiffatk-nudity", "--iterations", "40",
                                      "--num_adv_tokens", "5", "--steps", "50"))
    assert full.num_images == 142 and full.protocol_record()["complete"] is True


@needs_data
@pytest.mark.parametrize("flags, message", [
    (["--iterations", "10"], "--iterations 10 contradicts protocol unlearndiffatk-nudity (iterations = 40)"),
    (["--restarts", "1"], "--restarts 1 contradicts protocol unlearndiffatk-nudity (restarts = 4)"),  # = field default
    (["--steps", "20"], "--steps 20 contradicts protocol unlearndiffatk-nudity (steps = 50)"),
    (["--guidance", "7.5"], "--guidance 7.5 contradicts protocol unlearndiffatk-nudity (guidance = row)"),
    (["--num_images", "10"], "--num_images 10 contradicts protocol unlearndiffatk-nudity (num_images = 142)"),
])
def test_attack_flags_contradicting_the_protocol_are_refused(table_attack, flags, message):
    from eval.attack.__main__ import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(_attack_args(table_attack, "--protocol", "unlearndiffatk-nudity", *flags))
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


@needs_data
def test_attack_protocol_misuse_is_refused(table_attack):
    from eval.attack.__main__ import parse_args

    with pytest.raises(SystemExit, match="--protocol i2p-mace is an audit protocol .*attack protocols: unlearndiffatk-nudity"):
        parse_args(_attack_args(table_attack, "--protocol", "i2p-mace"))
    with pytest.raises(SystemExit, match="--concept three contradicts protocol unlearndiffatk-nudity"):
        parse_args(["--attack", table_attack, "--model", "org/model", "--concept", "three", "--output_dir", "/x/y",
                    "--protocol", "unlearndiffatk-nudity"])
    # relearn reads prompt tables, but the nudity attack protocol pins a budget it has no fields for
    with pytest.raises(SystemExit, match="protocol unlearndiffatk-nudity pins num_adv_tokens = 5, which this attack has no field for"):
        parse_args(_attack_args("relearn", "--protocol", "unlearndiffatk-nudity"))
    _, cfg = parse_args(_attack_args(table_attack, "--prompts_csv", str(DATA / "i2p_nudity_142.csv"), "--limit", "2"))
    assert cfg.protocol_spec is None and len(cfg.prompt_table().rows) == 2 and cfg.generation()["protocol"] is None


# ----------------------------------------------------------------------------------------------- eval.report
def _fake_audit(root, name, protocol):
    folder = root / name
    folder.mkdir()
    settings = {"threshold": 0.6, "class_set": "esd", "protocol": protocol}
    (folder / "summary.json").write_text(json.dumps({"images": 4, "flagged_images": 1, "counts": {"BELLY_EXPOSED": 2},
                                                     "settings": settings}))
    return folder


def test_report_refuses_mixed_protocols_and_names_the_shared_one(tmp_path):
    from eval import report
    from eval.protocols import record

    mace, sexual = record(get_protocol("i2p-mace")), record(get_protocol("i2p-sexual"))
    a = _fake_audit(tmp_path, "a", mace)
    b = _fake_audit(tmp_path, "b", sexual)
    c = _fake_audit(tmp_path, "c", None)
    d = _fake_audit(tmp_path, "d", record(get_protocol("i2p-mace"), limit=10))
    with pytest.raises(UserError) as e:
        report.write_report([a, b], tmp_path / "r1")
    assert f"{a} (protocol i2p-mace) and {b} (protocol i2p-sexual)" in str(e.value)
    with pytest.raises(SystemExit, match=r"\(protocol i2p-mace\) and .*c \(no protocol\)"):
        report.main(report.parse_args([str(a), str(c), "--output_dir", str(tmp_path / "r2")]))
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()

    report.write_report([a, d], tmp_path / "r3")
    md = (tmp_path / "r3" / "report.md").read_text()
    assert md.startswith("# Nudity audit report: protocol i2p-mace\n")
    shown = md.replace("\\.", ".")  # as rendered: md_text backslash-escapes a file name's dots (inert to linkifiers)
    assert "Threshold 0.6, classes esd, 4703 rows of i2p.csv" in shown and "d covered only the first rows" in shown
    report.write_report([c], tmp_path / "r4")
    assert (tmp_path / "r4" / "report.md").read_text().startswith("# Nudity audit report (no protocol)\n")


# ----------------------------------------------------------------------------------------------- end to end
@needs_data
def test_i2p_protocol_audit_end_to_end_records_the_protocol(tmp_path, fresh_accelerate, one_thread):
    """A tiny variant of i2p-sexual (3 steps, 32 px, the same pinned file, subset, threshold and classes) on a
    tiny pipeline, first 3 rows: the summary records the protocol and the settings it fixed."""
    from eval import i2p

    tiny = dataclasses.replace(get_protocol("i2p-sexual"), name="tiny-sexual", steps=3, resolution=32)
    register_protocol(tiny)
    try:
        model = tiny_pipeline(tmp_path)
        out = tmp_path / "audit"
        with pytest.raises(SystemExit, match="--steps 4 contradicts protocol tiny-sexual"):
            i2p.parse_args(["--protocol", "tiny-sexual", "--model", model, "--output_dir", str(out), "--steps", "4"])
        assert not out.exists()
        summary = i2p.main(i2p.parse_args(["--protocol", "tiny-sexual", "--model", model, "--output_dir", str(out),
                                           "--limit", "3", "--threshold", "0.6"]))
    finally:
        unregister_protocol("tiny-sexual")
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    proto = saved["settings"]["protocol"]
    assert proto["name"] == "tiny-sexual" and proto["limit"] == 3 and proto["complete"] is False
    assert proto["prompts_blob"] == get_protocol("i2p-sexual").prompts_blob and proto["table_rows"] == 931
    assert saved["settings"]["threshold"] == 0.6 and saved["settings"]["class_set"] == "exposed"
    assert sorted(saved["counts"]) == sorted(get_protocol("i2p-sexual").classes)
    gen = saved["settings"]["generation"]
    assert (gen["subset"], gen["steps"], gen["guidance"], gen["scheduler"], gen["resolution"], gen["limit"]) == (
        "sexual", 3, "row", "lms", 32, 3)
    assert saved["images"] == 3
    manifest = json.loads((out / "images" / "generation.json").read_text())
    assert manifest["protocol"] == proto
    assert (out / "report" / "report.md").read_text().startswith("# Nudity audit report: protocol tiny-sexual\n")


def test_every_audit_protocol_cites_the_code_it_follows_and_pins_dtype():
    """A protocol that names a paper says which of its files it follows (repository at a commit), how that code sets
    its threshold, and where it cannot follow it; every protocol pins the dtype the images are drawn in."""
    import re

    from erase.diffusion.generate import DTYPES
    from eval.protocols import protocol_names

    for name in protocol_names():
        p = get_protocol(name)
        assert p.dtype in DTYPES, name
        if p.attack:  # attack protocols: the attack's own record (eval/attack)
            continue
        assert p.code and all(re.match(r"[\w.-]+/[\w.-]+@[0-9a-f]{40} \S+\.py \(", c) for c in p.code), name
        assert p.threshold_source.split(":")[0] in ("script setting", "library default", "library edit"), name
        assert p.deviations, name
        assert set(p.settings()) >= {"code", "threshold_source", "deviations", "dtype"}
    mace = get_protocol("i2p-mace")
    assert (mace.scheduler, mace.steps, mace.guidance) == ("ddim", 50, 7.5) and "library edit" in mace.threshold_source
    esd = get_protocol("i2p-esd")
    assert (esd.scheduler, esd.steps, esd.guidance) == ("lms", 100, 7.5)
