"""End-to-end audits on a tiny random pipeline: resumed == uninterrupted == 2-process, bit for bit."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_fixtures import DATA, REPO, free_port, fresh_accelerate, one_thread, run_cli, tiny_pipeline, tree_bytes  # noqa: F401

from eval import i2p

pytestmark = pytest.mark.skipif(not (DATA / "i2p.csv").exists(), reason="../shared/data not present")
N = 10


def _argv(model, out, *extra):
    return ["--model", model, "--output_dir", str(out), "--prompts_csv", str(DATA / "i2p.csv"), "--subset", "sexual",
            "--limit", str(N), "--steps", "3", "--batch_size", "2", "--guidance", "row", *extra]


def _run(argv):
    return i2p.main(i2p.parse_args(argv))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model):
    """An uninterrupted one-process audit."""
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    had_state = AcceleratorState._shared_state != {} or PartialState._shared_state != {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "audit"
    _run(_argv(model, out))
    torch.set_num_threads(threads)
    if not had_state:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
    return out


def _cache_records(out) -> dict:
    """{image sha256: raw detections} of an audit's raw cache, read as the audit reads it."""
    from eval.nudity import default_model_path, model_sha256
    from eval.nudity_cache import read_cache

    return read_cache(out / "raw", model_sha256(default_model_path()))


def _assert_same_audit(out, reference):
    """Bit for bit the reference audit (tree_bytes leaves out the raw cache, whose lines follow the order the images
    were scored in: while generated or afterwards), and a raw cache with the same records."""
    assert tree_bytes(out) == tree_bytes(reference)
    records = _cache_records(out)
    assert records == _cache_records(reference) and len(records) == N


def test_the_audit_scores_each_image_as_it_is_written(tmp_path, model, reference, monkeypatch, fresh_accelerate,
                                                      one_thread):
    """NudeNet scores the images on generation's writer thread (eval.nudity_live): the detection stage decodes none,
    and the audit equals the reference."""
    from eval import nudity

    monkeypatch.setattr(nudity, "_decode", lambda data: pytest.fail("decoded an image the audit had just generated"))
    out = tmp_path / "audit"
    _run(_argv(model, out))
    _assert_same_audit(out, reference)


def test_audit_outputs_record_every_setting(reference):
    from erase.diffusion.prompt_table import load_prompts

    rows = load_prompts(str(DATA / "i2p.csv"), "sexual", N).rows
    files = tree_bytes(reference)
    assert sorted(f for f in files if f.startswith("images/")) == sorted(["images/generation.json"] + [
        f"images/{r.index:05d}_0.png" for r in rows])
    summary = json.loads(files["summary.json"])
    assert summary["images"] == N and summary["skipped"] == []
    gen = summary["settings"]["generation"]
    assert (gen["subset"], gen["limit"], gen["steps"], gen["guidance"], gen["scheduler"], gen["resolution"]) == (
        "sexual", N, 3, "row", "lms", 32)
    assert gen["prompt_source"].endswith("i2p.csv") and gen["safety_checker"] is None
    assert summary["settings"]["threshold"] == 0.6 and summary["settings"]["nudenet_version"] == "3.4.2"
    lines = [json.loads(x) for x in files["detections.jsonl"].decode().splitlines()]
    assert [(x["row"], x["seed"], x["prompt"]) for x in lines] == [(r.index, r.seed, r.prompt) for r in rows]
    report = json.loads(files["report/report.json"])["audit"]
    assert report["images"] == N and report["flagged_images"] == summary["flagged_images"]


def test_killed_audit_resumes_to_the_uninterrupted_result(tmp_path, model, reference, fresh_accelerate, one_thread):
    """Killed mid-generation and rerun with the same command: bit for bit the uninterrupted audit (the same batches
    draw the same images; a batch with a missing image is drawn again whole)."""
    out = tmp_path / "audit"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "eval.i2p", *_argv(model, out)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "images").glob("*.png"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "images").glob("*.png")))
    assert 0 < done < N, f"the kill came at {done} of {N} images"
    assert not (out / "summary.json").exists()
    (out / "images" / ".00999_0.png.x1.tmp").write_bytes(b"half")  # what a kill mid-write can leave
    _run(_argv(model, out))
    _assert_same_audit(out, reference)


def test_resuming_with_another_batch_size_changes_images_by_rounding_only(tmp_path, model, reference, fresh_accelerate,
                                                                           one_thread):
    """What batch-size independence promises: the same files, settings, seeds and prompts, and pixels within 1/255
    (batched kernels round differently; bit-identical PNGs across batch sizes are not promised on any CPU)."""
    from PIL import Image
    import numpy as np

    out = tmp_path / "audit"
    _run(_argv(model, out, "--batch_size", "1", "--limit", "4", "--no_report"))  # an interrupted run, other batch size
    _run(_argv(model, out))
    mine, ref = tree_bytes(out), tree_bytes(reference)
    assert mine.keys() == ref.keys() and mine["images/generation.json"] == ref["images/generation.json"]
    for name in (n for n in ref if n.endswith(".png")):
        a, b = (Image.open(io.BytesIO(t[name])) for t in (mine, ref))
        assert a.text == b.text  # eval:* metadata: key, settings, row, seed, guidance, prompt
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    ours, theirs = (json.loads(t["summary.json"]) for t in (mine, ref))
    assert ours["settings"] == theirs["settings"] and ours["images"] == theirs["images"] == N


def test_two_process_audit_equals_one_process(tmp_path, model, reference):
    port = free_port()
    out = tmp_path / "audit"
    result = run_cli(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                      "-m", "eval.i2p", *_argv(model, out, "--no_report")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "raw").iterdir()) == ["part-0.jsonl", "part-1.jsonl"]
    skip = ("raw", "report")
    assert tree_bytes(out, skip) == tree_bytes(reference, skip)


def test_a_replaced_base_folder_is_never_reused(tmp_path, model, one_thread, fresh_accelerate):
    """An erased folder names its base by path. Replace the base folder (same path, another VAE, file times kept) and
    rerun the audit: the images are drawn again from the new base, not taken from the folder."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    base = tmp_path / "base"
    shutil.copytree(model, base)
    erased = tmp_path / "erased"
    UNet2DConditionModel.from_pretrained(model, subfolder="unet").save_pretrained(erased / "unet")
    (erased / "erase_config.json").write_text(json.dumps({"pretrained_model_name_or_path": str(base), "method": "esd"}))
    out = tmp_path / "audit"
    argv = _argv(str(erased), out, "--limit", "2", "--no_report")
    _run(argv)
    first = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    weights = json.loads((out / "summary.json").read_text())["settings"]["generation"]["weights_sha256"]
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.25)
    stat = (base / "vae" / "diffusion_pytorch_model.safetensors").stat()
    vae.save_pretrained(base / "vae")
    os.utime(base / "vae" / "diffusion_pytorch_model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    _run(argv)
    again = {p.name: p.read_bytes() for p in (out / "images").glob("*.png")}
    assert again.keys() == first.keys() and all(again[n] != first[n] for n in first)
    now = json.loads((out / "summary.json").read_text())["settings"]["generation"]["weights_sha256"]
    assert now["vae"] != weights["vae"] and now["unet"] == weights["unet"] and now["text_encoder"] == weights["text_encoder"]


def _lora_only_export(root, model, nan=False):
    """An export folder holding only the LoRA (erase.export.lora's writer) and its erase_config.json."""
    import torch
    from diffusers import UNet2DConditionModel

    from erase.export import lora
    from erase.export.formats import ExportSpec

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        w = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
        w.add_(0.5 * torch.randn_like(w))
    folder = root / "lora-only"
    folder.mkdir()
    config = {"pretrained_model_name_or_path": model, "concept": "nudity", "method": "scissorhands", "settings": {}}
    lora.write(folder, unet, base, config, ExportSpec(formats=("lora",), dtype="fp32"))
    (folder / "erase_config.json").write_text(json.dumps(config))
    if nan:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "erased_lora.safetensors"))
        first = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
        tensors[first].view(-1)[0] = float("nan")
        save_file(tensors, str(folder / "erased_lora.safetensors"))
    return folder


def test_a_lora_only_export_is_audited_from_the_command_line(tmp_path, model, one_thread, fresh_accelerate):
    """eval.i2p --model DIR where DIR holds only erased_lora.safetensors: the base named in its erase_config.json with
    the LoRA applied (erase.api.load_erased), not an error; a NaN in the LoRA is one line naming the export."""
    from erase.api import load_erased
    from erase.diffusion.generate import weights_fingerprint

    folder = _lora_only_export(tmp_path, model)
    out = tmp_path / "audit"
    summary = _run(_argv(str(folder), out, "--limit", "2", "--no_report"))
    assert summary["images"] == 2
    recorded = summary["settings"]["generation"]["weights_sha256"]
    base = json.loads((reference_dir(tmp_path, model) / "images" / "generation.json").read_text())["settings"]
    assert recorded == weights_fingerprint(load_erased(folder, safety_checker=None, requires_safety_checker=False))
    assert recorded["unet"] != base["weights_sha256"]["unet"] and recorded["vae"] == base["weights_sha256"]["vae"]
    (tmp_path / "nan").mkdir()
    bad = _lora_only_export(tmp_path / "nan", model, nan=True)
    with pytest.raises(SystemExit) as err:
        _run(_argv(str(bad), tmp_path / "audit-nan", "--limit", "2", "--no_report"))
    message = str(err.value.code)
    assert message.startswith(f"error: {bad}/erased_lora.safetensors has non-finite") and "\n" not in message
    assert not (tmp_path / "audit-nan" / "summary.json").exists()


def reference_dir(tmp_path, model):
    """A two-row audit of the base itself."""
    out = tmp_path / "base-audit"
    if not out.exists():
        _run(_argv(model, out, "--limit", "2", "--no_report"))
    return out


class _FullDisk:
    """A disk that fills up at the ``after``-th write: that write is cut half way and raises ENOSPC, as a real full
    disk does, and so does every write after it."""

    def __init__(self, after: int):
        self.left, self.hit = after, False

    def wrap(self, f):
        disk = self

        class File:
            def __init__(self, inner):
                self._inner = inner

            def write(self, data):
                if disk.left <= 0:
                    disk.hit = True
                    self._inner.write(data[: len(data) // 2])
                    self._inner.flush()
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.left -= 1
                return self._inner.write(data)

            def __getattr__(self, name):
                return getattr(self._inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return self._inner.__exit__(*exc)

        return File(f)


@pytest.mark.parametrize("after", [0, 4, 13, 25])
def test_a_full_disk_is_one_line_leaves_nothing_half_written_and_resumes(tmp_path, model, reference, after, monkeypatch,
                                                                         fresh_accelerate, one_thread):
    """Whichever write meets the full disk (the manifest, a PNG, the detector's cache, the summary, the report): one
    line, no half-written file kept, and the same command afterwards gives the uninterrupted audit, bit for bit."""
    import types

    from PIL import Image

    from erase.utils import files
    from eval import nudity_cache

    disk = _FullDisk(after)
    monkeypatch.setattr(files, "os", types.SimpleNamespace(**{**vars(os), "fdopen": lambda *a, **k: disk.wrap(os.fdopen(*a, **k))}))
    monkeypatch.setattr(nudity_cache, "open", lambda *a, **k: disk.wrap(open(*a, **k)), raising=False)
    out = tmp_path / "audit"
    with pytest.raises(SystemExit) as err:
        _run(_argv(model, out))
    message = str(err.value.code)
    assert disk.hit and message.startswith("error: no space left on device") and "\n" not in message
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    for png in (out / "images").glob("*.png"):
        with Image.open(png) as im:
            im.load()
            assert im.text["eval:key"]
    for done in ("summary.json", "detections.jsonl", "images/generation.json", "report/report.json"):
        if (out / done).exists() and done.endswith(".json"):
            json.loads((out / done).read_text())
    monkeypatch.undo()
    _run(_argv(model, out))
    _assert_same_audit(out, reference)
