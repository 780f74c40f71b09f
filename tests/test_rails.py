"""Issue 20: every tool inside the rails (docs/RELIABILITY.md). The shared mechanisms are tested in the general case:
locks that are not regular files, ``--check`` on folders a run could not take, folders bad input leaves behind, the
hub cache as an output folder, a kill at every step of an export swap (beside and inside the folder), and the
inputs an audit reads (image folders with link loops, target patterns from an audited config). No model is loaded
unless a test says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from erase.utils.folders import LOCK_NAME, MARKER_NAME, check_output_dir, claim_output_dir
from eval_fixtures import USER_FACING, error_text

ROOT = Path(__file__).resolve().parents[1]


def one_line(err) -> str:
    msg = error_text(err)
    assert "\n" not in msg and msg.strip(), msg
    return msg


# ----------------------------------------------------------------------------------------------- the lock
@pytest.mark.parametrize("kind", ["symlink", "dangling", "folder", "fifo"])
def test_a_lock_path_that_is_not_a_regular_file_is_refused_and_its_target_untouched(tmp_path, kind):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    (out / MARKER_NAME).write_text("{}")
    victim.write_text("precious")
    lock = out / LOCK_NAME
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "dangling":
        lock.symlink_to(tmp_path / "created-through-the-link")
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    for attempt in (lambda: claim_output_dir(out), lambda: check_output_dir(out, probe=True)):
        with pytest.raises(USER_FACING) as err:
            attempt()
        assert LOCK_NAME in one_line(err) and ("link" in one_line(err) or "not a regular file" in one_line(err))
    assert victim.read_text() == "precious" and not (tmp_path / "created-through-the-link").exists()


# ----------------------------------------------------------------------------------------------- --check
def test_check_says_what_the_claim_would_for_a_locked_or_read_only_folder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from erase.utils.folders import "
                               "claim_output_dir; c = claim_output_dir(sys.argv[2]); print('held', flush=True); sys.stdin.read()",
                               str(ROOT), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(USER_FACING) as err:
            check_output_dir(out, probe=True)
        assert f"pid {holder.pid}" in one_line(err) and "in use" in one_line(err)
        check_output_dir(out)  # without the probe (every process of a launch checks before the main one claims)
    finally:
        holder.communicate("")
    check_output_dir(out, probe=True)  # released: ok again
    if Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):  # read-only even for root
        with pytest.raises(USER_FACING) as err:
            check_output_dir("/proc/sys/scissorhands-out", probe=True)
        assert "not writable" in one_line(err)
    if os.geteuid() == 0:
        return  # root writes into any folder; the read-only folder case needs an ordinary user
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for path in (ro, ro / "new" / "deeper"):
            with pytest.raises(USER_FACING) as err:
                check_output_dir(path)
            assert "not writable" in one_line(err) and "read-only" in one_line(err)
    finally:
        ro.chmod(0o755)


def test_check_of_erase_sd_refuses_a_folder_in_use(tiny, tmp_path, capsys):
    from erase.sd import main, parse_args

    base = tiny
    out = tmp_path / "out"  # a folder that another run holds
    with claim_output_dir(out):
        with pytest.raises(SystemExit) as err:
            main(parse_args(["--pretrained_model_name_or_path", base, "--concept", "nudity", "--output_dir", str(out), "--check"]))
        assert err.value.code not in (0, None)
        assert "in use by another run" in (capsys.readouterr().err + str(err.value.code))


# ----------------------------------------------------------------------------------------------- nothing left behind
def test_a_claim_that_wrote_nothing_leaves_no_marker_only_folder(tmp_path):
    new, empty, kept = tmp_path / "new" / "deeper", tmp_path / "empty", tmp_path / "kept"
    empty.mkdir()
    with claim_output_dir(new), claim_output_dir(empty):
        pass  # bad input found after the claim: the run writes nothing
    assert not new.parent.exists() and empty.is_dir() and not list(empty.iterdir())
    with claim_output_dir(kept) as claim:
        (claim.path / "result.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == sorted([MARKER_NAME, "result.json"])


def test_bad_input_found_after_the_claim_leaves_neither_the_output_nor_the_data_folder(tiny, tmp_path):
    """A target pattern that matches nothing is found once the model loads, after the folders were claimed."""
    from eval_fixtures import random_image_folders
    from erase.sd import main, parse_args

    random_image_folders(tmp_path, seed=1)
    with pytest.raises(USER_FACING) as err:
        main(parse_args([str(a) for a in ["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--forget_images",
                                          tmp_path / "forget", "--retain_images", tmp_path / "retain", "--targets", r"nothing\..*",
                                          "--data_dir", tmp_path / "new" / "data", "--output_dir", tmp_path / "new" / "out"]]))
    assert "nothing" in one_line(err) and not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------------------------- the hub cache
def test_a_hub_base_cache_and_the_cache_root_are_never_output_folders(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for path, words in [(snapshot, "the cached base model org/tiny"), (snapshot / "unet", "the cached base model org/tiny"),
                        (cache / "models--org--tiny", "the cached base model org/tiny"), (cache, "holds the cached base model"),
                        (tmp_path, "holds the cached base model"), (cache / "models--other--x", "lies inside the model hub's cache")]:
        with pytest.raises(USER_FACING) as err:
            claim_output_dir(path, base="org/tiny", overwrite=True)
        assert words in one_line(err), path
    assert sorted(p.name for p in snapshot.iterdir()) == ["model_index.json", "unet"]
    check_output_dir(tmp_path / "elsewhere", base="org/tiny")


# ----------------------------------------------------------------------------------------------- a kill during the export swap
OLD, NEW = {"unet": "old weights", "README.md": "old card"}, {"unet": "new weights", "README.md": "new card", "extra.safetensors": "new"}

_CHILD = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from erase.utils import folders
target, mode, kill_at = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
inside = mode == "inside"
if mode == "renames":  # a platform without renameat2: two renames
    folders._exchange = lambda a, b: False
stage = target / folders.temp_name("export") if inside else target.parent / folders.temp_name(target.name + ".new")
stage.mkdir()
for name, text in json.loads(sys.argv[5]).items():
    (stage / name).mkdir() if name == "unet" else None
    (stage / name / "w.txt" if name == "unet" else stage / name).write_text(text)
files = sorted(p.name for p in stage.iterdir()) + ["erase_config.json"]
(stage / "erase_config.json").write_text(json.dumps({"method": "m", "pretrained_model_name_or_path": "b", "export": {"files": files}}))
moves = [0]
def counted(real):
    def move(*a, **k):
        if moves[0] == kill_at:
            os._exit(137)  # as SIGKILL: no cleanup runs
        moves[0] += 1
        return real(*a, **k)
    return move
Path.rename = counted(Path.rename)
folders._exchange = counted(folders._exchange)
old = json.loads((target / "erase_config.json").read_text())["export"]["files"] if (target / "erase_config.json").exists() else []
folders.swap_in(target, stage, set(old), keep_last=("erase_config.json",))
print("moves", moves[0])
"""


def _folder_with(target: Path, export: dict | None) -> None:
    target.mkdir()
    (target / MARKER_NAME).write_text("{}")
    (target / LOCK_NAME).write_text("{}")
    (target / "notes.txt").write_text("mine")
    (target / "checkpoint-2").mkdir()
    (target / "checkpoint-2" / "erase_state.json").write_text("{}")
    if export:
        (target / "unet").mkdir()
        for name, text in export.items():
            (target / name / "w.txt" if name == "unet" else target / name).write_text(text)
        files = sorted(export) + ["erase_config.json"]
        (target / "erase_config.json").write_text(json.dumps({"method": "m", "pretrained_model_name_or_path": "b",
                                                              "export": {"files": files}}))


def _swap_killed_at(tmp_path, mode: str, kill_at: int, export: dict | None):
    target = tmp_path / f"out-{kill_at}"
    _folder_with(target, export)
    r = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), str(target), mode, str(kill_at),
                        json.dumps(NEW)], capture_output=True, text=True)
    assert r.returncode in (0, 137), r.stderr
    return target, r


@pytest.mark.parametrize("mode", ["beside", "renames", "inside"])
@pytest.mark.parametrize("first", [False, True], ids=["reexport", "first-export"])
def test_a_kill_at_any_step_of_the_swap_is_recovered_when_the_folder_is_next_claimed(tmp_path, mode, first):
    """Kill the swap before each of its moves (and not at all): the next claim of the folder finds the checkpoints,
    the user's files and one whole export (the old one or the new one) at top level, and nothing staged anywhere."""
    from erase.core.checkpoints import list_checkpoints

    kill_at, finished = 0, False
    while not finished:
        target, r = _swap_killed_at(tmp_path, mode, kill_at, None if first else OLD)
        finished = r.returncode == 0
        with claim_output_dir(target):
            names = {p.name for p in target.iterdir()}
            assert {"notes.txt", "checkpoint-2", MARKER_NAME, LOCK_NAME} <= names, (kill_at, names)
            assert [p.name for p in list_checkpoints(target)] == ["checkpoint-2"]
            assert not [p for p in (*target.iterdir(), *tmp_path.iterdir()) if p.name.endswith(".tmp") or p.name == ".swap.json"]
            if (target / "erase_config.json").exists():
                export = json.loads((target / "erase_config.json").read_text())["export"]["files"]
                which = NEW if "extra.safetensors" in export else OLD
                assert set(export) == set(which) | {"erase_config.json"} and set(export) <= names
                assert (target / "unet" / "w.txt").read_text() == which["unet"] and (target / "README.md").read_text() == which["README.md"]
                assert not (names - set(export) - {"notes.txt", "checkpoint-2", MARKER_NAME, LOCK_NAME})  # no mix
            else:  # only a first export killed before it was swapped in has none
                assert first and not names & {"unet", "README.md", "extra.safetensors"}, (kill_at, names)
        kill_at += 1
    assert kill_at >= 3


# ----------------------------------------------------------------------------------------------- an audit's inputs
def test_a_symlink_loop_in_an_image_folder_is_a_named_skip_and_in_a_caption_one_line(tmp_path):
    from erase.utils.images import read_caption, require_images, scan_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    (folder / "self.jpg").symlink_to("self.jpg")
    (folder / "c.txt").symlink_to("d.txt")
    (folder / "d.txt").symlink_to("c.txt")
    good, bad, _ = scan_images(folder)
    assert not good and all("symlink loop" in b["reason"] for b in bad)
    assert {b["file"] for b in bad} == {"a.png", "b.png", "self.jpg", "c.txt", "d.txt"}
    with pytest.raises(USER_FACING) as err:
        require_images(folder, "--forget_images")
    assert "a.png: symlink loop" in one_line(err) and "self.jpg" in one_line(err)
    with pytest.raises(USER_FACING) as err:
        read_caption(folder / "c.txt", folder)
    assert "symlink loop" in one_line(err)


@pytest.mark.parametrize("pattern", [r"(?:[\w.]|[a-z])*(?<=\d\d\d)", r"(.*)(.*)(.*)(.*)(.*)(.*)\6\5\4\3\2\1"])
@pytest.mark.parametrize("where", ["targets", "exclude"])
def test_a_catastrophic_target_pattern_is_one_line_within_its_time_bound(monkeypatch, pattern, where):
    """A pattern read from an audited model's erase_config.json (relearn's 'targets' set) is matched under a time
    bound: the selection stops with a TargetError naming it instead of hanging."""
    import time

    import torch.nn as nn

    import erase.core.targets as targets
    from erase.core.targets import TargetError, select_parameters

    monkeypatch.setattr(targets, "MATCH_SECONDS", 0.2)
    model = nn.ModuleDict({f"down_blocks_{i}_attentions_0_transformer_blocks_0_attn2_to_k": nn.Linear(2, 2) for i in range(3)})
    start = time.perf_counter()
    with pytest.raises(TargetError) as err:
        select_parameters(model, pattern, None) if where == "targets" else select_parameters(model, "all", pattern)
    assert time.perf_counter() - start < 3 and "takes over 0.2 s" in str(err.value) and repr(pattern) in str(err.value)
    assert list(select_parameters(model, r".*\.weight", r".*_1_.*")) == [f"down_blocks_{i}_attentions_0_transformer_blocks_0_attn2_to_k.weight"
                                                                       for i in (0, 2)]  # ordinary patterns as before


def test_bare_urls_domains_and_emails_are_inert_markdown():
    from erase.utils.text import md_text

    evil = "see http://e.vil/x, HTTPS://e.vil, ftp://e.vil, www.e.vil, e.vil/path and a@e.vil or mailto:a@e.vil"
    out = md_text(evil)
    import re

    assert not re.search(r"(?<!\\)://|www\.|e\.vil", out, re.IGNORECASE) and "@" not in out.replace("&#8203;@", "")
    assert md_text("lr 0.001, v1.4, 7.5") == "lr 0.001, v1.4, 7.5"  # numbers stay as they are
    for render in _renderers():
        html = render(out)
        assert "<a" not in html and "e.vil/x" in html, html


def _renderers():
    """The markdown renderers installed here that autolink bare URLs (GFM's cmark-gfm, markdown-it with linkify)."""
    found = []
    try:
        import cmarkgfm

        found.append(cmarkgfm.github_flavored_markdown_to_html)
    except ImportError:
        pass
    try:
        import linkify_it  # noqa: F401  (markdown-it's linkify needs it)
        from markdown_it import MarkdownIt

        found.append(MarkdownIt("gfm-like").render)
    except ImportError:
        pass
    return found


# ----------------------------------------------------------------------------------------------- an export on the tiny pipeline
@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """One step of Scissorhands in every format, with prompts that carry URLs, from a base in a folder named like a user's."""
    from eval_fixtures import random_image_folders
    from erase.sd import main, parse_args

    root = tmp_path_factory.mktemp("private-user-dirs")
    random_image_folders(root, seed=0)
    (root / "forget.txt").write_text("a cube from http://e.vil/x\nwww.e.vil cube\n")
    out = root / "erased"
    main(parse_args([str(a) for a in ["--pretrained_model_name_or_path", tiny, "--concept", "cube", "--forget_prompts", root / "forget.txt",
                                      "--forget_images", root / "forget", "--retain_images", root / "retain", "--data_dir", root / "data",
                                      "--output_dir", out, "--saliency_batches", "1", "--lr", "1e-3", "--topk", "20",
                                      "--max_train_steps", "1", "--export_format", "diffusers,single_file,lora"]]))
    return out


def _shared_files(out: Path) -> dict[str, str]:
    """Every text a user shares with the export: the card, the JSON files but the local record, every safetensors header."""
    from safetensors import safe_open

    texts = {p.name: p.read_text() for p in out.iterdir() if p.suffix in (".md", ".json") and p.name != "erase_local.json"}
    for p in [*out.glob("*.safetensors"), *out.glob("*/*.safetensors")]:
        with safe_open(str(p), "pt") as f:
            texts[str(p.relative_to(out))] = json.dumps(f.metadata())
    return texts


def test_no_local_path_in_a_shared_file_and_the_local_record_loads_the_base(exported, tiny, tmp_path):
    from erase.api import load_erased

    root = str(exported.parent)
    texts = _shared_files(exported)
    assert {"README.md", "erase_config.json", "erased.safetensors", "erased_lora.safetensors", "unet_delta.safetensors"} <= set(texts)
    leaks = {name: text.count(root) for name, text in texts.items() if root in text or str(Path(tiny).parent) in text}
    assert not leaks
    meta = json.loads(texts["erased.safetensors"])
    assert meta["base_model"] == Path(tiny).name and meta["modelspec.title"] == f"{Path(tiny).name} without cube"
    assert "http://" not in texts["README.md"] and "www.e" not in texts["README.md"]  # bare URLs of a prompt are inert
    local = json.loads((exported / "erase_local.json").read_text())
    assert local["paths"]["pretrained_model_name_or_path"] == str(Path(tiny).resolve())
    assert local["paths"]["settings.forget_prompts"] == str(exported.parent / "forget.txt") and "share" in local["note"]
    assert "erase_local.json" in json.loads(texts["erase_config.json"])["export"]["files"]
    assert type(load_erased(exported, format="delta")).__name__ == "StableDiffusionPipeline"  # found through the local record
    shared = tmp_path / "shared"  # a copy without the local record, as shared: one line, or the base given
    shutil.copytree(exported, shared, ignore=shutil.ignore_patterns("erase_local.json", "data"))
    with pytest.raises(ValueError, match="was the local folder 'sd'.*pass base="):
        load_erased(shared, format="delta")
    assert type(load_erased(shared, format="delta", base=tiny)).__name__ == "StableDiffusionPipeline"


def test_the_local_record_round_trips_every_path_and_nothing_else(tmp_path):
    """Every absolute path that exists here, wherever it sits in the config (nested, in lists), is shared as its last
    component and read back whole; prompts, hub ids and relative names are left as they are."""
    from erase.export.formats import write_json
    from erase.export.local import read_record, split_paths, write_record

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.txt").write_text("x")
    config = {"method": "m", "pretrained_model_name_or_path": "org/model", "output_dir": str(tmp_path / "out"),
              "settings": {"forget_prompts": str(tmp_path / "in" / "p.txt"), "seed": 0, "data": [str(tmp_path / "in"), "rel/dir"]},
              "concepts": [{"forget_prompts": ["/imagine a cat", "a [cat](http://e.vil)"]}], "none": None}
    (tmp_path / "out").mkdir()
    shared, paths = split_paths(config)
    assert shared["settings"]["forget_prompts"] == "p.txt" and shared["settings"]["data"] == ["in", "rel/dir"]
    assert shared["output_dir"] == "out" and shared["concepts"] == config["concepts"] and shared["pretrained_model_name_or_path"] == "org/model"
    assert set(paths) == {"output_dir", "settings.forget_prompts", "settings.data[0]"}
    write_record(tmp_path / "out", config, write_json)
    assert str(tmp_path) not in (tmp_path / "out" / "erase_config.json").read_text()
    assert read_record(tmp_path / "out") == config
    (tmp_path / "out" / "erase_local.json").unlink()  # a shared copy: the names only
    assert read_record(tmp_path / "out") == shared


@pytest.mark.parametrize("fmt, name", [("lora", "erased_lora.safetensors"), ("single_file", "erased.safetensors"),
                                       ("delta", "unet_delta.safetensors"), ("diffusers", "unet/diffusion_pytorch_model.safetensors")])
def test_load_erased_never_returns_non_finite_weights_and_names_the_export(exported, tmp_path, fmt, name):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from erase.api import load_erased

    out = tmp_path / "nan"
    shutil.copytree(exported, out, ignore=shutil.ignore_patterns("data"))
    with safe_open(str(out / name), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(out / name))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]  # a LoRA's first is an alpha: folded into a scale
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(out / name), metadata=meta)
    with pytest.raises(ValueError) as err:
        load_erased(out, format=fmt, torch_dtype=torch.float32)
    assert "non-finite" in str(err.value) and str(out) in str(err.value) and "\n" not in str(err.value)


def test_a_cut_latents_cache_is_encoded_again(exported, tiny, tmp_path, caplog):
    from erase.sd import main, parse_args

    root = exported.parent
    caches = sorted((root / "data").glob("latents-*.safetensors"))
    assert caches
    for cache in caches:
        whole = cache.read_bytes()
        cache.write_bytes(whole[: len(whole) // 2])  # cut by a full disk or a kill
    main(parse_args([str(a) for a in ["--pretrained_model_name_or_path", tiny, "--concept", "cube", "--forget_prompts", root / "forget.txt",
                                      "--forget_images", root / "forget", "--retain_images", root / "retain", "--data_dir", root / "data",
                                      "--output_dir", tmp_path / "again", "--saliency_batches", "1", "--lr", "1e-3", "--topk", "20",
                                      "--max_train_steps", "1"]]))
    assert "encoding the images again" in caplog.text
    from safetensors.torch import load_file

    assert all(load_file(str(c))["mean"].shape[0] == 4 for c in caches)


@pytest.mark.parametrize("given", ["", " ", ",", "lora,", [], ["diffusers", ""]])
def test_an_empty_export_format_is_one_line(tiny, tmp_path, capsys, given):
    """An empty --export_format (or export_format=[] in the API) is refused, never silently the default."""
    from types import SimpleNamespace

    from erase.export.formats import spec_from_args
    from erase.sd import main, parse_args

    with pytest.raises(USER_FACING) as err:
        spec_from_args(SimpleNamespace(export_format=given))
    assert "empty name" in one_line(err)
    assert spec_from_args(SimpleNamespace()).formats == ("diffusers",)  # not given: the default
    if isinstance(given, str):
        with pytest.raises(SystemExit) as err:
            main(parse_args(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", str(tmp_path / "o"),
                             "--export_format", given, "--check"]))
        assert err.value.code not in (0, None) and "--export_format" in (capsys.readouterr().err + str(err.value.code))
        assert not (tmp_path / "o").exists()


def test_a_replaced_base_is_refused_wherever_an_export_reloads_it(exported, tiny, tmp_path):
    """The export records a sha256 of every weights file of its base; replace the base's VAE (same path, file times
    kept): load_erased in every format that reloads the base, and the audits' loader, refuse it in one line."""
    import torch
    from diffusers import AutoencoderKL

    from erase.api import load_erased
    from erase.diffusion.generate import read_export

    base, export = tmp_path / "base", tmp_path / "export"
    shutil.copytree(tiny, base)
    shutil.copytree(exported, export, ignore=shutil.ignore_patterns("data"))
    local = json.loads((export / "erase_local.json").read_text())
    for key in ("pretrained_model_name_or_path", "base_model.path"):
        local["paths"][key] = str(base)
    (export / "erase_local.json").write_text(json.dumps(local))
    assert "vae/diffusion_pytorch_model.safetensors" in json.loads((export / "erase_config.json").read_text())["base_model"]["weights_sha256"]
    load_erased(export, format="delta")  # the same weights: loads
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    stat = vae_file.stat()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.25)
    vae.save_pretrained(base / "vae")
    os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for fmt in ("diffusers", "lora", "delta"):
        with pytest.raises(ValueError, match="not the one this export was made from: vae/diffusion_pytorch_model.safetensors"):
            load_erased(export, format=fmt)
    with pytest.raises(USER_FACING) as err:
        read_export(export)
    assert "vae/diffusion_pytorch_model.safetensors" in one_line(err)
    load_erased(export, format="single_file")  # carries its own VAE and text encoder: the base gives only configs


def test_an_atomic_write_has_the_mode_a_plain_write_would_have(tmp_path):
    """mkstemp's 0600 never reaches the final file: an export or a results file is as readable as open() makes it."""
    import os

    from erase.utils.files import atomic_write_text

    atomic_write_text(tmp_path / "a.json", "{}")
    (tmp_path / "b.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()) and os.path.isfile(tmp_path / "a.json")
