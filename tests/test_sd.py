"""erase/sd.py end to end on a tiny random SD pipeline (eval.tiny), through `accelerate launch` on CPU.

One module-scoped run generates the data every other run reuses (--data_dir). Launched runs: the reference run
(4 steps, checkpoint at 2, full pipeline export), its resume from checkpoint-2, and a 2-process DDP run.
Method rows and bad inputs run in-process (``main(parse_args([...]))``) to keep the suite short.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from eval_fixtures import USER_FACING, error_text, free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "erase" / "sd.py")
SMALL_DATA = ["--num_forget_images", "4", "--num_retain_images", "4", "--num_inference_steps", "2", "--generation_batch_size", "4",
              "--log_every", "1"]
SMALL = [*SMALL_DATA, "--saliency_batches", "2"]  # for Scissorhands (the default method): its saliency pass, short


def launch(args, nproc: int = 1, timeout: int = 300, config_file: str | None = None, mixed_precision: str = "no") -> subprocess.CompletedProcess:
    """``accelerate launch erase/sd.py`` on the CPU; ``config_file``: an accelerate config (e.g. docs/accelerate/
    fsdp_bf16.yaml) whose process count and mixed precision the arguments override."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if config_file is not None:  # the config's launcher, on CPU processes (gloo)
        env["ACCELERATE_USE_CPU"] = "true"
        flags = ["--config_file", config_file, "--num_processes", str(nproc)]
    elif nproc == 1:
        flags = ["--cpu", "--num_processes", "1", "--num_cpu_threads_per_process", "1"]
    else:  # CPU DDP (gloo): torchrun launcher + ACCELERATE_USE_CPU, since --cpu and --multi_gpu exclude each other
        env["ACCELERATE_USE_CPU"] = "true"
        flags = ["--multi_gpu", "--num_processes", str(nproc)]
    if nproc > 1:
        flags += ["--main_process_port", str(free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1", "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", SCRIPT, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def in_process(args):
    from erase.sd import main, parse_args

    return main(parse_args([str(a) for a in args]))


def unet_state(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def data_dir(tiny, tmp_path_factory):
    """Forget / retain images and cached latents, generated once (a 0-step run) and shared by every run here."""
    data = tmp_path_factory.mktemp("data")
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path_factory.mktemp("prep"),
                "--data_dir", data, *SMALL_DATA, "--max_train_steps", 0, "--method", "ft"])
    return data


@pytest.fixture(scope="module")
def reference(tiny, data_dir, tmp_path_factory):
    """4 steps of Scissorhands with a checkpoint at step 2 and a full pipeline export."""
    out = tmp_path_factory.mktemp("ref")
    launch(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", out, "--data_dir", data_dir, *SMALL,
            "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2, "--lr", "1e-3", "--topk", 20,
            "--export_pipeline"])
    return out


def test_export_reloads_and_only_targets_change(tiny, reference):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from erase.diffusion.adapter import TARGET_PRESETS
    from erase.core.targets import matches

    unet = UNet2DConditionModel.from_pretrained(str(reference), subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    new, old = unet.state_dict(), base.state_dict()
    assert new.keys() == old.keys()
    xattn = [TARGET_PRESETS["xattn"]]
    targeted = [n for n in new if matches(n, xattn)]
    assert len(targeted) == 20 and all(".attn2." in n for n in targeted)
    for n in new:
        if n not in targeted:
            assert torch.equal(new[n], old[n]), n  # bit-identical outside the targets
    changed = [n for n in targeted if not torch.equal(new[n], old[n])]
    assert changed
    # the delta holds exactly the changed tensors, with the settings in its metadata
    delta = load_file(str(reference / "unet_delta.safetensors"))
    assert sorted(delta) == sorted(changed)
    for n, t in delta.items():
        assert torch.equal(t, new[n])
    with safe_open(str(reference / "unet_delta.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == Path(tiny).name and meta["concept"] == "nudity" and meta["method"] == "scissorhands"
    assert json.loads(meta["settings"])["topk"] == 20
    # --export_pipeline: the folder is a full pipeline that generates
    pipe = StableDiffusionPipeline.from_pretrained(str(reference), safety_checker=None)
    assert torch.equal(pipe.unet.state_dict()[changed[0]], new[changed[0]])
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo of a church", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3)
    assert not any(p.name.startswith(".") for p in reference.iterdir())  # no temporary export left


def test_config_and_model_card(tiny, reference, data_dir):
    from erase.export.local import read_record

    assert json.loads((reference / "erase_config.json").read_text())["pretrained_model_name_or_path"] == Path(tiny).name
    cfg = read_record(reference)  # the local record (erase_local.json) holds the path
    assert cfg["pretrained_model_name_or_path"] == tiny and cfg["concept"] == "nudity" and cfg["method"] == "scissorhands"
    assert cfg["settings"]["targets"] == "xattn" and cfg["settings"]["lr"] == 1e-3 and cfg["seed"] == 0
    assert cfg["targets"]["num_tensors"] == 20
    trim = cfg["prepare"]["trim"]
    assert trim["summary"]["reset"] == round(0.2 * cfg["targets"]["num_parameters"])
    assert sum(s["reset"] for s in trim["per_tensor"].values()) == trim["summary"]["reset"]
    assert cfg["method_config"]["topk"] == 20 and cfg["method_config"]["forget_loss"] == "redirect"
    assert cfg["data"]["retain_loss"] == "distill" and cfg["adapter"]["distill_prompts"] == len(cfg["retain_prompts"]) > 0
    assert "retain" not in cfg["data"]  # distillation needs no retain images
    assert cfg["num_processes"] == 1 and cfg["global_batch_size"] == 2
    assert {"torch", "diffusers", "transformers", "accelerate"} <= set(cfg["versions"])
    assert cfg["wall_seconds"] > 0 and len(cfg["history"]) == 4
    # the projection's guarantee, checked on the step Adam applied at each of the 4 steps
    assert cfg["repair"]["update_checked"] == 4 and cfg["repair"]["update_violated_after"] == 0
    assert all({"update_projected", "update_dot_before", "update_dot_after"} <= set(r) for r in cfg["history"])
    assert cfg["concept_prompts"]["anchor_prompt"] == "a photo of a person wearing clothes"
    assert cfg["data"]["forget"] == {"count": 4, "source": "generated", "captioned": 0}
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert [r["seed"] for r in manifest["forget"]["images"]] == [0, 1, 2, 3]
    assert manifest["forget"]["images"][0]["prompt"] == cfg["concept_prompts"]["generation_prompts"][0]
    card = (reference / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and f"base_model: {Path(tiny).name}\n" in card
    assert tiny not in card  # no local path in the card
    assert "nudity" in card and "scissorhands" in card and "UNet2DConditionModel.from_pretrained" in card
    assert "StableDiffusionPipeline.from_pretrained" in card
    assert f"{trim['summary']['reset']:,} of" in card


def test_resume_equals_uninterrupted(tiny, reference, data_dir, tmp_path):
    """Resume from checkpoint-2 of the reference run: the final weights are bit-identical (same seed, same draws)."""
    shutil.copytree(reference / "checkpoint-2", tmp_path / "checkpoint-2")
    launch(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data_dir, *SMALL,
            "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2, "--lr", "1e-3", "--topk", 20,
            "--resume_from_checkpoint", "latest"])
    a, b = unet_state(reference), unet_state(tmp_path)
    assert all(torch.equal(a[n], b[n]) for n in a)
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["resumed_from"].endswith("checkpoint-2") and [r["step"] for r in cfg["history"]] == [3, 4]


def test_two_processes_match_one(tiny, data_dir, tmp_path):
    """DDP on 2 CPU processes with batch 1 == 1 process with batch 2 (same examples, same per-example noise), and FSDP on
    2 processes (docs/accelerate/fsdp_bf16.yaml: the UNet's blocks sharded, the cross-attention targets whole) == DDP.
    The forget weight is adaptive (`--forget_target`): it moves after the warm-up, alike on every process.

    --topk 100 makes the trim independent of the saliency values (each batch's gradient is averaged across
    processes before |.|, but float rounding can still reorder near ties); SGD keeps tiny float differences of the
    gradient mean tiny in the weights.
    """
    common = ["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--data_dir", data_dir, *SMALL,
              "--max_train_steps", 7, "--lr", "0.05", "--optimizer", "sgd", "--topk", 100, "--lam", "0.5",
              "--forget_target", "0.9", "--forget_gain", "0.5"]  # λ moves after 5 steps: every process must move it alike
    launch([*common, "--output_dir", tmp_path / "two", "--train_batch_size", 1], nproc=2)
    in_process([*common, "--output_dir", tmp_path / "one", "--train_batch_size", 2])
    two, one, base = unet_state(tmp_path / "two"), unet_state(tmp_path / "one"), load_file(f"{tiny}/unet/diffusion_pytorch_model.safetensors")
    cfg = json.loads((tmp_path / "two" / "erase_config.json").read_text())
    assert cfg["num_processes"] == 2 and cfg["global_batch_size"] == 2
    lam = json.loads((tmp_path / "one" / "erase_config.json").read_text())["repair"]["forget_weight"]["lam_final"]
    assert lam != 0.5 and cfg["repair"]["forget_weight"]["lam_final"] == pytest.approx(lam, rel=1e-4)
    for n in two:
        if ".attn2." not in n:
            assert torch.equal(two[n], base[n]), n
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(two[n], base[n]) for n in two)
    launch([*common, "--output_dir", tmp_path / "fsdp", "--train_batch_size", 1], nproc=2,
           config_file=str(ROOT / "docs" / "accelerate" / "fsdp_bf16.yaml"))
    sharded = unet_state(tmp_path / "fsdp")
    for n in two:  # the same computation on gathered blocks: equal up to float rounding (conv kernels on other buffers)
        if ".attn2." not in n:
            assert torch.equal(sharded[n], base[n]), n
        torch.testing.assert_close(sharded[n], two[n], rtol=1e-5, atol=1e-7)
    record = json.loads((tmp_path / "fsdp" / "erase_config.json").read_text())["sharding"]
    assert record["processes"] == 2 and "ResnetBlock2D" in record["wrap"] and record["sharded_blocks"] > 0


@pytest.mark.parametrize("row", [
    ["--method", "ft"],
    ["--method", "ga", "--forget_bound", "5"],
    ["--method", "l1sparse"],
    ["--method", "salun", "--mask_ratio", "30"],
    ["--method", "esd", "--esd_ddim_steps", "2", "--targets", "noxattn"],
    ["--forget_loss", "redirect", "--gradient_checkpointing", "--gradient_accumulation_steps", "2"],
    ["--forget_loss", "esd", "--esd_ddim_steps", "2", "--targets", "selfattn", "--num_memories", "2"],
    ["--targets", r"up_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2\.to_[kv]\.weight", "--memory_refresh", "2"],
    ["--forget_target", "0.2", "--forget_gain", "0.5", "--max_train_steps", "7"],
], ids=["ft", "ga", "l1sparse", "salun", "esd", "redirect+ckpt+accum", "esd-term+2mem", "regex", "adaptive-lam"])
def test_methods(tiny, data_dir, tmp_path, row):
    method = row[row.index("--method") + 1] if "--method" in row else "scissorhands"
    saliency = ["--saliency_batches", 1] if method in ("scissorhands", "salun") else []  # an option of these two only
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data_dir,
                *SMALL_DATA, "--max_train_steps", 2, *saliency, "--lr", "1e-3", *row])
    cfg = json.loads((tmp_path / "erase_config.json").read_text())
    assert cfg["delta"]["tensors_changed"] > 0
    if "--forget_target" in row:  # the redirect term's λ follows its target after the warm-up, recorded per step
        assert cfg["repair"]["forget_weight"]["forget_steps"] == 7 and cfg["method_config"]["forget_target"] == 0.2
        assert [r["lam"] for r in cfg["history"][:5]] == [0.3] * 5 and cfg["history"][-1]["lam"] != 0.3
    assert all(all(isinstance(v, str) or v == v for v in r.values()) for r in cfg["history"])  # finite logs (no NaN)
    new, base = unet_state(tmp_path), load_file(f"{tiny}/unet/diffusion_pytorch_model.safetensors")
    for n in cfg["delta"]["per_tensor"]:
        assert n in cfg["targets"]["tensors"]
    for n in new:
        if n not in cfg["targets"]["tensors"]:
            assert torch.equal(new[n], base[n]), n


def test_data_resumes_and_user_folders(tiny, data_dir, tmp_path):
    """An interrupted generation redoes only the missing image, identically; user folders work with sidecar prompts."""
    forget = data_dir / "forget"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in forget.glob("*.png")}
    (forget / "00001_0.png").unlink()
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path / "a", "--data_dir", data_dir,
                *SMALL_DATA, "--max_train_steps", 1, "--method", "ft"])
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in forget.glob("*.png")}
    assert after.keys() == before.keys()
    for name, (mtime, blob) in before.items():
        if name != "00001_0.png":
            assert after[name][0] == mtime
    assert after["00001_0.png"][1] == before["00001_0.png"][1]  # regenerated byte-identical (seeded per image)

    user, mine = tmp_path / "mine", tmp_path / "my_forget"
    user.mkdir()
    mine.mkdir()
    for p in sorted((data_dir / "retain").glob("*.png"))[:2]:
        shutil.copy(p, user / p.name)
    (user / "00000_0.txt").write_text("a caption of my own\n")
    for p in sorted(forget.glob("*.png")):
        shutil.copy(p, mine / p.name)
    (mine / "00002_0.txt").write_text("a church on a hill at dusk\n")
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "church", "--output_dir", tmp_path / "b",
                "--forget_images", mine, "--retain_images", user, "--max_train_steps", 1, "--saliency_batches", 1])
    cfg = json.loads((tmp_path / "b" / "erase_config.json").read_text())
    assert cfg["data"]["retain"]["count"] == 2 and cfg["data"]["forget"]["count"] == 4
    assert cfg["data"]["forget"]["captioned"] == 1
    manifest = json.loads((tmp_path / "b" / "data" / "manifest.json").read_text())
    assert [r["prompt"] for r in manifest["retain"]["images"]] == ["a caption of my own", ""]
    assert [(r["prompt"], r["captioned"]) for r in manifest["forget"]["images"]] == [
        (None, False), (None, False), ("a church on a hill at dusk", True), (None, False)]
    assert not (tmp_path / "b" / "data" / "forget").exists()  # nothing generated


def test_non_finite_loss_stops_cleanly(tiny, data_dir, tmp_path):

    with pytest.raises(USER_FACING) as err:
        in_process(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data_dir,
                    *SMALL, "--max_train_steps", 6, "--checkpointing_steps", 1, "--lr", "1e30"])
    message = error_text(err)
    assert message.startswith("error: loss became") and "\n" not in message and "checkpoint-" in message
    assert (tmp_path / "checkpoint-1").is_dir()
    assert not (tmp_path / "erase_config.json").exists() and not (tmp_path / "unet").exists()
    assert not (tmp_path / "unet_delta.safetensors").exists() and not (tmp_path / ".export.tmp").exists()


def test_several_concepts_in_one_run(tiny, tmp_path):
    """--concept three,five: one forget block per concept (own prompts and seeds), one export listing both."""
    out = tmp_path / "out"
    in_process(["--pretrained_model_name_or_path", tiny, "--concept", "three,five", "--output_dir", out, *SMALL,
                "--num_forget_images", 2, "--max_train_steps", 2, "--lr", "1e-3", "--saliency_batches", 1])
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["concept"] == "three,five" and [c["name"] for c in cfg["concepts"]] == ["three", "five"]
    assert cfg["data"]["forget"]["count"] == 4 and cfg["adapter"]["forget_groups"] == 2
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    prompts = [r["prompt"] for r in manifest["forget"]["images"]]
    assert all("three" in p or "3" in p for p in prompts[:2]) and all("five" in p or "5" in p for p in prompts[2:])
    assert not any(w in p.split() for p in cfg["retain_prompts"] for w in ("three", "3", "five", "5"))
    card = (out / "README.md").read_text()
    assert "**three**" in card and "**five**" in card and "a handwritten digit four" in card and "a handwritten digit six" in card
    assert cfg["delta"]["tensors_changed"] > 0


def test_topk_selecting_nothing_is_one_line(tiny, data_dir, tmp_path):

    with pytest.raises(USER_FACING) as err:
        in_process(["--pretrained_model_name_or_path", tiny, "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data_dir,
                    *SMALL, "--max_train_steps", 1, "--saliency_batches", 1, "--topk", "1e-6"])
    message = error_text(err)
    assert "--topk 1e-06 % of the" in message and "selects none" in message and "\n" not in message
    assert not (tmp_path / "erase_config.json").exists()
