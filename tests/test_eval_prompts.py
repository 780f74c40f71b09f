import pytest
from eval_fixtures import DATA, fresh_accelerate, run_cli  # noqa: F401  (fixture)

from erase.diffusion.prompt_table import load_prompts
from eval_fixtures import USER_FACING, error_text

needs_data = pytest.mark.skipif(not (DATA / "i2p.csv").exists(), reason="../shared/data not present")


@needs_data
@pytest.mark.parametrize(
    "name, subset, rows, skipped",
    [
        ("i2p.csv", "all", 4702, 1),  # row 2260 has an empty prompt
        ("i2p.csv", "sexual", 931, 0),
        ("i2p.csv", "nudity", 854, 0),
        ("i2p_nudity_142.csv", "all", 142, 0),
        ("i2p_nudity_142.csv", "sexual", 116, 0),
        ("i2p_violence.csv", "all", 756, 0),
        ("coco_10k.csv", "all", 10000, 0),
    ],
)
def test_subsets_of_the_shared_tables(name, subset, rows, skipped):
    table = load_prompts(str(DATA / name), subset)
    assert len(table.rows) == rows and len(table.skipped_empty) == skipped
    if name == "i2p.csv" and subset == "all":
        assert table.skipped_empty == [2260] and 2260 not in {r.index for r in table.rows}
    if subset == "sexual":
        assert all("sexual" in [c.strip() for c in r.meta["categories"].split(",")] for r in table.rows)
    if subset == "nudity":
        assert all(r.meta["nudity_percentage"] > 0 for r in table.rows)


@needs_data
def test_rows_keep_their_table_index_seed_and_guidance():
    table = load_prompts(str(DATA / "i2p.csv"), "sexual", limit=3)
    assert [r.index for r in table.rows] == [r.meta["case_number"] for r in table.rows]
    assert len(table.rows) == 3 and table.describe()["limit"] == 3
    first = table.rows[0]
    assert first.index == 103 and first.seed == 1867756129 and first.guidance == 7.0
    coco = load_prompts(str(DATA / "coco_10k.csv"), limit=2)
    assert coco.rows[0].seed == 41337 and coco.rows[0].guidance is None


def _fail(*args, **kwargs) -> str:
    with pytest.raises(USER_FACING) as err:
        load_prompts(*args, **kwargs)
    message = error_text(err)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_bad_tables_fail_with_one_clear_line(tmp_path):
    assert "prompts CSV not found" in _fail(str(tmp_path / "nope.csv"))
    (tmp_path / "empty.csv").write_text("")
    assert "prompts CSV is empty" in _fail(str(tmp_path / "empty.csv"))
    (tmp_path / "bad.csv").write_text('prompt,evaluation_seed\n"unclosed,1\n')
    assert "malformed" in _fail(str(tmp_path / "bad.csv"))
    (tmp_path / "cols.csv").write_text("text,seed\nhello,1\n")
    msg = _fail(str(tmp_path / "cols.csv"))
    assert "missing column(s): prompt; evaluation_seed or sd_seed" in msg
    (tmp_path / "ok.csv").write_text("prompt,evaluation_seed\nhello,1\n")
    assert "categories (needed by --subset sexual)" in _fail(str(tmp_path / "ok.csv"), "sexual")
    assert "evaluation_guidance or sd_guidance_scale" in _fail(str(tmp_path / "ok.csv"), need_guidance=True)
    assert "unknown subset 'violent'; choose one of: all, sexual, nudity" in _fail(str(tmp_path / "ok.csv"), "violent")
    (tmp_path / "seed.csv").write_text("prompt,evaluation_seed\nhello,abc\n")
    assert "row 0: seed/guidance must be numbers" in _fail(str(tmp_path / "seed.csv"))


def test_empty_prompts_are_skipped_and_counted(tmp_path):
    (tmp_path / "t.csv").write_text('prompt,sd_seed,sd_guidance_scale\na,1,7\n,2,7\n"  ",3,7\nb,4,9\n')
    table = load_prompts(str(tmp_path / "t.csv"))
    assert [(r.index, r.prompt, r.seed, r.guidance) for r in table.rows] == [(0, "a", 1, 7.0), (3, "b", 4, 9.0)]
    assert table.skipped_empty == [1, 2] and table.describe()["skipped_empty_prompts"] == 2


def test_audit_cli_rejects_bad_input_before_writing(tmp_path, fresh_accelerate):
    (tmp_path / "cols.csv").write_text("text,seed\nhello,1\n")
    out = tmp_path / "audit"
    argv = ["--model", "x/y", "--output_dir", str(out), "--prompts_csv", str(tmp_path / "cols.csv")]
    result = run_cli(["python", "-m", "eval.i2p", *argv, "--subset", "violent"])
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: unknown subset 'violent'; choose one of: all, sexual, nudity"
    from eval import i2p

    with pytest.raises(USER_FACING, match=r"--threshold must be in \[0, 1\], got 2.0"):
        i2p.parse_args([*argv, "--threshold", "2"])
    with pytest.raises(USER_FACING, match=r"is missing column\(s\): prompt"):
        i2p.main(i2p.parse_args(argv))
    assert not out.exists()


def test_hub_table_offline_fails_with_one_line_naming_the_local_option():
    message = _fail(None)
    assert "could not load AIML-TUDA/i2p from the hub" in message and "--prompts_csv" in message


@needs_data
@pytest.mark.parametrize("command, extra", [
    ("eval.i2p", ["--prompts_csv", str(DATA / "i2p.csv"), "--limit", "3"]),
    ("eval.utility", ["--prompts_csv", str(DATA / "coco_10k.csv"), "--limit", "3", "--reference", "REF"]),
])
@pytest.mark.parametrize("flags, words", [
    (["--seed_offset", "-5"], "seed_offset -5 is outside [0, "),
    (["--seed_offset", str(2**63)], "is outside [0, "),
    (["--seed_offset", str(2**63 - 1)], "(row seed + seed offset + k) is outside [0, "),  # overflows with the row's seed
    (["--seed_offset", "1.5"], "invalid int value: '1.5'"),
    (["--images_per_prompt", "0"], "images_per_prompt must be >= 1"),
])
def test_seeds_out_of_range_are_one_line_before_anything_is_written(tmp_path, command, extra, flags, words,
                                                                     fresh_accelerate, capsys):
    """Every seed an audit draws (row seed + --seed_offset + k) is a valid generator seed, checked with the other
    inputs: a negative or overflowing one is one line, and no folder is made."""
    import importlib

    module = importlib.import_module(command)
    (tmp_path / "ref").mkdir()
    out = tmp_path / "out"
    argv = ["--model", str(tmp_path / "no-model"), "--output_dir", str(out), *flags,
            *[str(tmp_path / "ref") if a == "REF" else a for a in extra]]
    with pytest.raises(SystemExit) as err:
        module.main(module.parse_args(argv))
    message = str(err.value.code) if err.value.code != 2 else capsys.readouterr().err.strip()  # argparse's own exit
    assert words in message and "\n" not in message
    assert not out.exists()
