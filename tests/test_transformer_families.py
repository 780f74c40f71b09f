"""SD3 / SD3.5 and Flux (dev, schnell) through the same run as the UNet families (erase/diffusion/families/sd3.py,
flux.py; issue 18): detection and --list_targets per text path, the prompt encoding the pipelines themselves use, the
flow-matching objective, every method, `accelerate launch` with a resume equal to the uninterrupted run, 2 processes
equal to 1, and every export format loaded back through diffusers' own loaders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_sd import launch

DITS = ("sd3", "sd35", "flux_dev", "flux_schnell")
FAMILY = {"sd3": "sd3", "sd35": "sd3", "flux_dev": "flux", "flux_schnell": "flux"}
SMALL = ["--num_forget_images", 2, "--num_retain_images", 2, "--num_inference_steps", 2, "--generation_batch_size", 2, "--log_every", 1]


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    from eval.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("dits")
    return {f: build_tiny_pipeline(root / f, family=f) for f in DITS}


@pytest.fixture(scope="module")
def data(dits, tmp_path_factory):
    """Forget / retain images and latents per model, made once (a 0-step FT run)."""
    out = {}
    for f, base in dits.items():
        out[f] = tmp_path_factory.mktemp(f"data-{f}")
        run(["--pretrained_model_name_or_path", base, "--concept", "nudity", "--output_dir", tmp_path_factory.mktemp("prep"),
             "--data_dir", out[f], *SMALL, "--max_train_steps", 0, "--method", "ft"])
    return out


def run(args):
    from erase.sd import main, parse_args

    return main(parse_args([str(a) for a in args]))


def transformer_state(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_detection_and_targets_name_each_text_path(dits, capsys):
    from erase.diffusion.families import detect

    assert {f: detect(p).name for f, p in dits.items()} == FAMILY
    for preset, must, never in (("text", ("context_embedder.weight", "add_k_proj"), ("time_text_embed",)),
                                ("pooled", ("time_text_embed.text_embedder.linear_1.weight",), ("add_k_proj", "context_embedder")),
                                ("text_pooled", ("context_embedder.weight", "add_v_proj", "time_text_embed.text_embedder"), ("to_q.weight", "ff.net")),
                                # the default: the token stream, chosen on the tuning digits (docs/FAMILIES.md)
                                ("xattn", ("context_embedder.weight", "add_v_proj", "to_add_out"), ("time_text_embed", "to_q.weight", "ff.net"))):
        for f in ("sd35", "flux_dev"):
            info = run(["--pretrained_model_name_or_path", dits[f], "--list_targets", "--targets", preset])
            names = " ".join(info["tensors"])
            assert all(m in names for m in must) and not any(n in names for n in never), (f, preset, names)
            assert info["denoiser"] == "transformer" and info["preset_note"]
            out = capsys.readouterr().out
            assert out.startswith(f"# model family: {FAMILY[f]} (") and f"--targets {preset!r}" in out


@pytest.mark.parametrize("family", DITS)
def test_prompts_are_encoded_as_the_pipeline_encodes_them(dits, family):
    import diffusers

    from erase.diffusion.families import FAMILIES, load_text

    fam = FAMILIES[FAMILY[family]]
    pipe = getattr(diffusers, fam.pipeline_class).from_pretrained(dits[family])
    text = load_text(fam, dits[family])
    packed = text.encode(["a photo of a cat", "a dog"], "cpu")
    torch.set_grad_enabled(False)  # as the pipeline's __call__ encodes (attention kernels differ with gradients on)
    if fam.name == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(["a photo of a cat", "a dog"], None, None, device="cpu", do_classifier_free_guidance=False,
                                                  max_sequence_length=text.sequence_length)
    else:
        hidden, pooled, _ = pipe.encode_prompt(["a photo of a cat", "a dog"], None, device="cpu", max_sequence_length=text.sequence_length)
    torch.set_grad_enabled(True)
    assert torch.equal(packed[:, :-1], hidden) and torch.equal(packed[:, -1, : pooled.shape[-1]], pooled)
    assert text.pooled_dim() == pooled.shape[-1] and not packed[:, -1, pooled.shape[-1]:].any()


@pytest.mark.parametrize("method, extra", [("scissorhands", ["--saliency_batches", 1, "--topk", 20]), ("esd", ["--esd_ddim_steps", 3]),
                                           ("salun", ["--saliency_batches", 1]), ("ga", ["--forget_bound", 10]), ("ft", []), ("l1sparse", [])])
@pytest.mark.parametrize("family", ["sd35", "flux_dev"])
def test_every_method_erases_from_a_transformer(dits, data, tmp_path, family, method, extra):
    out = tmp_path / "o"
    run(["--pretrained_model_name_or_path", dits[family], "--concept", "nudity", "--method", method, "--output_dir", out,
         "--data_dir", data[family], *SMALL, "--max_train_steps", 2, "--lr", "1e-3", *extra])
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["model_family"] == FAMILY[family] and cfg["export"]["denoiser"] == "transformer"
    assert cfg["adapter"]["objective"]["objective"] == "flow" and cfg["adapter"]["prediction_type"] == "velocity"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in cfg["history"])
    base = transformer_state(dits[family])
    erased = transformer_state(out)
    changed = sorted(n for n in base if not torch.equal(base[n], erased[n]))
    assert changed and set(changed) <= set(cfg["targets"]["tensors"])  # only the targets moved
    assert sorted(load_file(str(out / "transformer_delta.safetensors"))) == changed
    from erase.diffusion.families.mmdit import PRESET_NOTES

    assert cfg["target_path"] == PRESET_NOTES[cfg["settings"]["targets"]]  # the record names the text path the run cut


@pytest.fixture(scope="module")
def reference(dits, data, tmp_path_factory):
    """Scissorhands on Flux dev through `accelerate launch`, 4 steps, checkpoint at 2, every export format."""
    out = tmp_path_factory.mktemp("flux-ref")
    launch(["--pretrained_model_name_or_path", dits["flux_dev"], "--concept", "nudity", "--output_dir", out, "--data_dir", data["flux_dev"],
            *SMALL, "--saliency_batches", 1, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2, "--lr", "1e-3",
            "--topk", 20, "--export_format", "diffusers,single_file,lora", "--export_dtype", "fp32"])
    return out


def test_resume_equals_uninterrupted_on_flux(dits, data, reference, tmp_path):
    shutil.copytree(reference / "checkpoint-2", tmp_path / "checkpoint-2")
    launch(["--pretrained_model_name_or_path", dits["flux_dev"], "--concept", "nudity", "--output_dir", tmp_path, "--data_dir", data["flux_dev"],
            *SMALL, "--saliency_batches", 1, "--max_train_steps", 4, "--train_batch_size", 2, "--lr", "1e-3", "--topk", 20,
            "--resume_from_checkpoint", "latest"])
    a, b = transformer_state(reference), transformer_state(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "erase_config.json").read_text())["resumed_from"].endswith("checkpoint-2")


def test_two_processes_match_one_on_sd35(dits, data, tmp_path):
    """DDP on 2 CPU processes with batch 1 == 1 process with batch 2, as for the UNet families (tests/test_sd.py: --topk
    100 and SGD keep float rounding of the averaged gradients from reordering near ties or being amplified)."""
    common = ["--pretrained_model_name_or_path", dits["sd35"], "--concept", "nudity", "--data_dir", data["sd35"], *SMALL,
              "--saliency_batches", 1, "--max_train_steps", 2, "--lr", "0.05", "--optimizer", "sgd", "--topk", 100, "--lam", "0.5"]
    launch([*common, "--output_dir", tmp_path / "two", "--train_batch_size", 1], nproc=2)
    run([*common, "--output_dir", tmp_path / "one", "--train_batch_size", 2])
    a, b = transformer_state(tmp_path / "one"), transformer_state(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], transformer_state(dits["sd35"])[k]) for k in a)
    assert json.loads((tmp_path / "two" / "erase_config.json").read_text())["num_processes"] == 2


@pytest.mark.parametrize("fmt", ["diffusers", "lora", "delta"])
def test_every_export_of_a_transformer_loads_back(dits, reference, fmt):
    from erase import load_erased

    pipe = load_erased(str(reference), format=fmt)
    if fmt == "lora":
        pipe.fuse_lora()
    erased = transformer_state(reference)
    state = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    if fmt == "lora":  # the truncated change, as far from the full export as erased_lora.json says
        rel = json.loads((reference / "erased_lora.json").read_text())["rel_error"]
        changed = [k for k in erased if not torch.equal(erased[k], transformer_state(dits["flux_dev"])[k])]
        full = torch.cat([erased[k].flatten() for k in changed]) - torch.cat([transformer_state(dits["flux_dev"])[k].flatten() for k in changed])
        got = torch.cat([state[k].flatten() for k in changed]) - torch.cat([transformer_state(dits["flux_dev"])[k].flatten() for k in changed])
        assert float((full - got).norm() / full.norm()) <= rel + 1e-3
    else:
        assert all(torch.equal(state[k], erased[k]) for k in erased)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a photo", num_inference_steps=1, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(img)).all()


@pytest.mark.parametrize("keep", ["all", "lora"])
def test_an_audit_draws_with_the_erased_transformer(dits, reference, tmp_path, keep):
    """eval's loader (eval.models.load_audited, what eval.i2p / eval.utility call) on a Flux export: its transformer/
    folder over the base, or only the LoRA a user shares; a UNet sampler is one line naming the family."""
    from eval.models import load_audited
    from erase.diffusion.generate import GenerationConfig, generate
    from erase.diffusion.prompt_table import PromptRow
    from erase.utils.errors import UserError

    folder = reference
    if keep == "lora":
        folder = tmp_path / "shared"
        folder.mkdir()
        for name in ("erase_config.json", "erase_local.json", "erased_lora.safetensors", "erased_lora.json"):
            shutil.copy(reference / name, folder / name)  # on this machine: with the local record of the base's path
    with pytest.raises(UserError, match="--scheduler lms does not sample a flux model.*flow_euler"):
        load_audited(str(folder), scheduler="lms")
    pipe = load_audited(str(folder), scheduler="flow_euler")
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    state = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    erased, base = transformer_state(reference), transformer_state(dits["flux_dev"])
    changed = [k for k in erased if not torch.equal(erased[k], base[k])]
    assert changed
    if keep == "all":
        assert all(torch.equal(state[k], erased[k]) for k in erased)
    else:  # the shared LoRA is loaded onto the base as an active adapter, not ignored
        assert pipe.get_active_adapters()
    cfg = GenerationConfig(model=str(folder), steps=2, guidance=3.5, scheduler="flow_euler", resolution=32, batch_size=2)
    records = generate([PromptRow(index=i, prompt=p, seed=i) for i, p in enumerate(["a photo", "a cat"])], tmp_path / "img", cfg, pipe=pipe)
    assert len(records) == 2 and all((tmp_path / "img" / r["file"]).is_file() for r in records)


def test_the_documented_accelerate_configs_are_what_accelerate_reads():
    """docs/accelerate/multi_gpu_bf16.yaml and fsdp_bf16.yaml (docs/FAMILIES.md, 'Scale') parse with accelerate's own
    loader: data parallelism in bf16, and FSDP2 in bf16 with every process loading the base whole."""
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(DOCS / "multi_gpu_bf16.yaml"))
    assert ddp.distributed_type.name == "MULTI_GPU" and ddp.mixed_precision == "bf16" and ddp.num_processes >= 2
    fsdp = load_config_from_file(str(DOCS / "fsdp_bf16.yaml"))
    assert fsdp.distributed_type.name == "FSDP" and fsdp.mixed_precision == "bf16" and fsdp.num_processes >= 2
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False


DOCS = Path(__file__).parents[1] / "docs" / "accelerate"
FSDP = str(DOCS / "fsdp_bf16.yaml")


def test_fsdp_with_the_documented_config_equals_data_parallelism(dits, data, tmp_path):
    """docs/accelerate/fsdp_bf16.yaml on 2 CPU processes: the untrained weights sharded, the targets whole on each; the
    erased transformer equals DDP's on 2 processes bit for bit."""
    common = ["--pretrained_model_name_or_path", dits["sd35"], "--concept", "nudity", "--data_dir", data["sd35"], *SMALL,
              "--saliency_batches", 1, "--max_train_steps", 2, "--lr", "0.05", "--optimizer", "sgd", "--topk", 50, "--lam", "0.5",
              "--train_batch_size", 1]
    launch([*common, "--output_dir", tmp_path / "fsdp"], nproc=2, config_file=FSDP)
    launch([*common, "--output_dir", tmp_path / "ddp"], nproc=2)
    a, b, base = transformer_state(tmp_path / "fsdp"), transformer_state(tmp_path / "ddp"), transformer_state(dits["sd35"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "fsdp" / "erase_config.json").read_text())
    shard = cfg["sharding"]
    assert shard["kind"] == "fsdp2" and shard["processes"] == 2 and shard["wrap"] == ["JointTransformerBlock"]
    assert shard["whole_parameters"] == cfg["targets"]["num_parameters"]
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(dits["sd35"], subfolder="transformer")
    assert shard["sharded_parameters"] + shard["whole_parameters"] == sum(p.numel() for p in model.parameters())
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and changed <= set(cfg["targets"]["tensors"])
    assert json.loads((tmp_path / "ddp" / "erase_config.json").read_text())["sharding"] is None


def test_fsdp_bf16_esd_resumes_as_uninterrupted_on_flux(dits, data, tmp_path):
    """FSDP in bf16 on Flux dev with ESD (its partial sampling draws a different number of base steps per example: every
    process runs the longest), --robust with a search batch smaller than the processes (a sharded forward is collective:
    the idle process runs one, weighted 0), Adam, gradient accumulation and clipping: a checkpoint holds the targets and
    the optimizer state whole (safetensors, no model file), a resume from it equals the uninterrupted run, and the export
    is the base outside the targets, bit for bit."""
    common = ["--pretrained_model_name_or_path", dits["flux_dev"], "--concept", "nudity", "--data_dir", data["flux_dev"], *SMALL,
              "--method", "esd", "--max_train_steps", 4, "--train_batch_size", 2, "--gradient_accumulation_steps", 2,
              "--max_grad_norm", "0.5", "--lr", "1e-3", "--robust", "--robust_every", 2, "--robust_steps", 1, "--robust_batch_size", 1]
    launch([*common, "--output_dir", tmp_path / "ref", "--checkpointing_steps", 2], nproc=2, config_file=FSDP, mixed_precision="bf16")
    ckpt = tmp_path / "ref" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"targets.safetensors", "optimizer.safetensors"} <= files and not any(f.startswith("model") for f in files)
    cfg = json.loads((tmp_path / "ref" / "erase_config.json").read_text())
    assert sorted(load_file(str(ckpt / "targets.safetensors"))) == sorted(cfg["targets"]["tensors"])
    shutil.copytree(ckpt, tmp_path / "res" / "checkpoint-2")
    launch([*common, "--output_dir", tmp_path / "res", "--resume_from_checkpoint", "latest"], nproc=2, config_file=FSDP,
           mixed_precision="bf16")
    a, b, base = transformer_state(tmp_path / "ref"), transformer_state(tmp_path / "res"), transformer_state(dits["flux_dev"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "res" / "erase_config.json").read_text())["resumed_from"].endswith("checkpoint-2")
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed and changed <= set(cfg["targets"]["tensors"])
    assert cfg["sharding"]["processes"] == 2 and cfg["engine"]["mixed_precision"] == "bf16"
