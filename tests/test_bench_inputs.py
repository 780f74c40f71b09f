"""The benchmark scripts' bad input (benchmarks/inputs.py): one line naming the bad value and what is allowed, a
non-zero exit, and nothing written or started: every check runs before an output folder is made, a model trained or
a job launched; a ``--json`` file is never written over a file the script did not write. Argument checks only: a
guard fails the test if a script gets as far as its work."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


class WorkStarted(Exception):
    pass


def _guard(*_, **__):
    raise WorkStarted("the script started its work on bad input")


def refused(capsys, fn, argv) -> str:
    """Run ``fn(argv)``; it must exit non-zero with one line (returned) before any work."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn(argv)
    code = e.value.code
    assert code not in (0, None), code
    message = str(code) if isinstance(code, str) else capsys.readouterr().err.strip()
    assert message and "\n" not in message, message
    return message


def module(name: str, monkeypatch=None, guards=()):
    """The script's module, each of ``guards`` (its own function, or a dotted library path) made to fail the test."""
    m = importlib.import_module(f"benchmarks.{name}")
    for attr in guards:
        monkeypatch.setattr(*((attr,) if "." in attr else (m, attr)), _guard)
    return m


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_module_imports(name):
    """closed_form_speed.py imported SDXL_UNET from gpu_figures after it moved to architectures: it could not run."""
    importlib.import_module(f"benchmarks.{name}")


def test_closed_form_speed_runs_as_a_script_and_checks_its_flags(tmp_path, capsys, monkeypatch):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "closed_form_speed.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--archs" in done.stdout, done.stderr[-2000:]
    m = module("closed_form_speed", monkeypatch, ["text_layer_stub", "build_unet"])
    for argv, words in ((["--archs", "sd15"], "unknown architecture 'sd15'"), (["--methods", "uce,esd"], "'esd'"),
                        (["--concepts", "1,0"], "--concepts 0"), (["--repeats", "0"], "--repeats 0"),
                        (["--concepts", "1,1"], "repeats 1")):
        assert words in refused(capsys, m.main, argv)


# ------------------------------------------------------------------------------------------------ --json files
JSON_FLAGS = [  # (script, argv before --json, the flag, functions that would start the work)
    ("memory_plan", [], "--json", ["plan"]),
    ("core_overhead", [], "--json", ["engine_steps"]),
    ("sd_step", [], "--json", ["mode_ratio"]),
    ("closed_form_speed", [], "--json", ["text_layer_stub"]),
    ("robust_targets", ["none.json"], "--json", ["load_rows"]),
    ("shapes_rank", ["none.json"], "--json", ["merged"]),
    ("shapes_train_step", ["--threads", "1"], "--json", ["step_seconds"]),
    ("shapes_fd_interval", ["{tmp}"], "--json", ["audits", "eval.shapes.judges.load_judges"]),
    ("gpu_figures", ["--smoke"], "--output", ["_run"]),
]


@pytest.mark.parametrize("name, before, flag, guards", JSON_FLAGS, ids=[j[0] for j in JSON_FLAGS])
def test_a_json_file_the_script_did_not_write_is_refused(tmp_path, capsys, monkeypatch, name, before, flag, guards):
    """memory_plan.py --json and core_overhead.py --json overwrote any file; --json under a file was a traceback."""
    m = module(name, monkeypatch, guards)
    before = [a.replace("{tmp}", str(tmp_path)) for a in before]
    precious = tmp_path / "v.json"
    precious.write_text("precious\n")
    message = refused(capsys, m.main, [*before, flag, str(precious)])
    assert f"{flag} {precious} exists and was not written by this tool" in message
    assert precious.read_text() == "precious\n"
    message = refused(capsys, m.main, [*before, flag, str(precious / "x.json")])  # a path under a file
    assert f"{precious} is a file, not a folder" in message and not (tmp_path / "v.json.tmp").exists()


def test_a_json_file_the_script_wrote_is_replaced_atomically(tmp_path, capsys):
    from benchmarks.inputs import check_json_output, has_keys
    from erase.utils.files import atomic_write_json

    out = tmp_path / "plan.json"
    atomic_write_json(out, {"rows": [], "mid_unet_repair_step_s_median": 1.0})
    assert check_json_output("--json", str(out), has_keys("rows", "mid_unet_repair_step_s_median")) == out
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left beside it


# ------------------------------------------------------------------------------------------------ counts, names, lists
BAD = [  # (script, entry point, argv, words the line must hold, functions that would start the work)
    ("sd_step", "main", ["--threads", "0"], "--threads 0", ["mode_ratio"]),
    ("sd_step", "main", ["--steps", "0"], "--steps 0", ["mode_ratio"]),
    ("sd_step", "main", ["--latent", "12"], "--latent 12", ["mode_ratio"]),
    ("memory_plan", "main", ["--processes", "0"], "--processes 0", ["plan"]),
    ("memory_plan", "main", ["--processes", "-2"], "--processes -2", ["plan"]),
    ("core_overhead", "main", ["--width", "0"], "--width 0", ["engine_steps"]),
    ("attack_cost", "main", ["--output_dir", "{out}", "--parts", "bogus"], "unknown part 'bogus'", ["digits_part", "sd_part", "cce_part", "protocol_cost"]),
    ("attack_cost", "main", ["--output_dir", "{out}", "--parts", "sd,sd"], "names 'sd' twice", ["digits_part", "sd_part", "cce_part", "protocol_cost"]),
    ("attack_cost", "main", ["--output_dir", "{out}", "--gpu_forward_s", "nan"], "--gpu_forward_s nan", ["digits_part", "sd_part", "cce_part", "protocol_cost"]),
    ("attack_adv", "main", ["--output_dir", "{out}", "--erasures", "ga:100,bogus:5"], "unknown method 'bogus'", ["digits_part"]),
    ("attack_adv", "main", ["--output_dir", "{out}", "--concept", "eleven"], "--concept 'eleven'", ["digits_part"]),
    ("attack_tune", "main", ["--output_dir", "{out}", "--candidates", "ref,x"], "unknown candidate 'x'", ["erase_models"]),
    ("attack_relearn", "main", ["--output_dir", "{out}", "--models", "a={out}/none"], "is not a model folder", ["eval.attack.relearn_audit"]),
    ("audit", "parse_args", ["--output_dir", "{out}", "--dtype", "fp8"], "unknown dtype 'fp8'", []),
    ("shapes_train_step", "main", ["--threads", "1,x"], "--threads 'x'", ["step_seconds"]),
    ("shapes_train_step", "main", ["--precisions", "fp32,fp64"], "unknown precision 'fp64'", ["step_seconds"]),
    ("shapes_base", "main", ["--output_dir", "{out}", "--concepts", "zzz"], "unknown concept 'zzz'", ["eval.shapes.train.train_shapes_model"]),
    ("shapes_base", "main", ["--output_dir", "{out}", "--guidance", "4,x"], "--guidance 'x'", ["eval.shapes.train.train_shapes_model"]),
    ("shapes_autoencoder", "main", ["--channels", "16,x"], "--channels '16,x'", ["eval.shapes.train.scene_images"]),
    ("shapes_autoencoder", "main", ["--channels", "16,32", "--steps", "0"], "--steps 0", ["eval.shapes.train.scene_images"]),
    ("exports", "main", ["--output_dir", "{out}", "--num_images", "0"], "--num_images 0", ["hold_output_dir"]),
    ("gpu_figures", "main", ["--smoke", "--budget_s", "nan", "--output", "{out}.json"], "--budget_s nan", ["_run"]),
]


@pytest.mark.parametrize("name, entry, argv, words, guards", BAD, ids=[f"{b[0]} {' '.join(b[2][-2:])}" for b in BAD])
def test_bad_values_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, name, entry, argv, words, guards):
    """Tracebacks (sd_step --threads 0, shapes_base --concepts zzz, shapes_autoencoder --channels 16,x) and accepted
    nonsense (memory_plan --processes 0, core_overhead --width 0, sd_step --steps 0, attack_cost --parts bogus)."""
    m = module(name, monkeypatch, guards)
    out = tmp_path / "out"
    message = refused(capsys, getattr(m, entry), [a.replace("{out}", str(out)) for a in argv])
    assert words in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ tuning grids and sweeps
FAIL_FAST = [  # (script, argv, words): each used to make its folder or launch work before failing
    ("digits_tune", ["--grid", "a=--bogus 1"], "unrecognized arguments: --bogus 1"),
    ("digits_tune", ["--grid", "a=--topk 500"], "--topk 500"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--grid", "a=--lr 1e-4"], "'a' is given twice"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--workers", "0"], "--workers 0"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--digits", "three,three"], "names 'three' twice"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--digits", "eleven"], "unknown digit 'eleven'"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--seeds", "0,0"], "repeats 0"),
    ("digits_tune", ["--grid", "a=--lr 1e-3", "--method", "bogus"], "--method 'bogus'"),
    ("shapes_tune", ["--grid", "a=--bogus 1"], "unrecognized arguments: --bogus 1"),
    ("shapes_tune", ["--grid", "a=--lam 0.1", "--workers", "0"], "--workers 0"),
    ("shapes_tune", ["--grid", "a=--lam 0.1", "--grid", "a=--lam 0.3"], "'a' is given twice"),
    ("shapes_tune", ["--grid", "a=--lam 0.1", "--seeds", "0,x"], "--seeds 'x'"),
    ("robust_digits", ["--grid", "a=bogus"], "'bogus' is not an erase/sd.py method"),
    ("robust_digits", ["--grid", "a=scissorhands --robust_every x"], "--robust_every"),
    ("robust_digits", ["--grid", "a=scissorhands", "--seeds", "0,0"], "repeats 0"),
    ("robust_digits", ["--grid", "a=scissorhands", "--digits", "one,1"], "names a digit twice"),
    ("robust_digits", ["--grid", "a=scissorhands", "--attack_options", "{x"], "--attack_options is not valid JSON"),
    ("robust_digits", ["--grid", "a=scissorhands", "--attacks", "bogus"], "bogus"),
    ("digits_sweep", ["--concepts", "three,three"], "names 'three' twice"),
    ("digits_sweep", ["--concepts", "three+five,five+three"], "names three+five twice"),
    ("digits_sweep", ["--concepts", "eleven"], "unknown digit 'eleven'"),
    ("digits_sweep", ["--concepts", "three", "--lanes", "0"], "--lanes 0"),
    ("digits_sweep", ["--concepts", "three", "--methods", "scissorhands,bogus"], "unknown method 'bogus'"),
    ("digits_sweep", ["--concepts", "three", "--", "--num_images", "0"], "--num_images must be >= 1"),
    ("digits_sweep", ["--concepts", "three", "--", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("name, argv, words", FAIL_FAST, ids=[f"{f[0]} {' '.join(f[1][-2:])}" for f in FAIL_FAST])
def test_grids_and_sweeps_fail_before_their_folder_or_a_job(tmp_path, capsys, monkeypatch, name, argv, words):
    """digits_tune --grid 'a=--bogus 1' / --workers 0 / --digits three,three, robust_digits --grid a=bogus / --seeds
    0,0 and digits_sweep --concepts three,three made their folder first; digits_sweep --concepts eleven launched a bench
    and left OUT/eleven.log. Each point's erase/sd.py flags are checked by erase/sd.py's own parser, named in the line."""
    m = module(name, monkeypatch, ["hold_output_dir", "run_bench"] if name == "digits_sweep" else ["hold_output_dir"])
    out = tmp_path / "out"
    if "--" in argv:  # after --: the sweep's extra bench flags
        i = argv.index("--")
        argv = [*argv[:i], "--output_dir", str(out), *argv[i:]]
    else:
        argv = [*argv, "--output_dir", str(out)]
    assert words in refused(capsys, m.main, argv)
    assert not out.exists() and list(tmp_path.iterdir()) == []
