"""Closed-form editors (UCE, SPEED; erase/core/methods/uce.py, speed.py) through erase/sd.py on every family: the edit
moves exactly the text-input layers, UCE's weights meet its closed form's optimality conditions, SPEED's change lies in
the null space of its priors and keeps the null text, several concepts are one edit, no repair step is taken or
accepted, and every export format loads back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FAMILIES = ("sd1", "sdxl", "sd3", "flux_dev")
DENOISER = {"sd1": "unet", "sdxl": "unet", "sd3": "transformer", "flux_dev": "transformer"}
#: what each method must change, per denoiser: a UNet's cross-attention keys / values, an MMDiT's two text embedders
EXPECTED = {("uce", "unet"): r".*\.attn2\.to_[kv]\.weight", ("speed", "unet"): r".*\.attn2\.to_v\.weight",
            ("uce", "transformer"): r"(context_embedder|time_text_embed\.text_embedder\.linear_1)\.weight",
            ("speed", "transformer"): r"(context_embedder|time_text_embed\.text_embedder\.linear_1)\.weight"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from eval.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("closed-form")
    return {f: build_tiny_pipeline(root / f, family=f) for f in FAMILIES}


def run(args):
    from erase.sd import main, parse_args

    return main(parse_args([str(a) for a in args]))


def state(folder, part: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / part / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def erased(bases, tmp_path_factory):
    """UCE and SPEED on every family with their defaults, every export format (fp32), made once."""
    out = {}
    for family in FAMILIES:
        for method in ("uce", "speed"):
            folder = tmp_path_factory.mktemp(f"{family}-{method}")
            formats = "diffusers,single_file,lora" if family in ("sd1", "flux_dev") else "diffusers"
            run(["--pretrained_model_name_or_path", bases[family], "--concept", "three", "--method", method, "--output_dir", folder,
                 "--export_format", formats, "--export_dtype", "fp32"])
            out[family, method] = folder
    return out


def view(base, concept: str, method: str, tmp_path, **options):
    """The run's stages up to the prompt tables, and the closed-form view of them (erase/diffusion/closed_form.py)."""
    from erase.diffusion.closed_form import TextView
    from erase.diffusion.conditioning import encode, prompt_tables
    from erase.diffusion.config import EraseConfig
    from erase.diffusion.data import no_images
    from erase.diffusion.load import load_components

    config = EraseConfig.from_options(base, concept, method=method, output_dir=str(tmp_path / "v"), **options).validate()
    parts = load_components(config)
    tables = prompt_tables(config.concept_set, no_images(config, parts, 32))
    emb = encode(tables, parts.text, "cpu")
    return TextView(parts.family, parts.text, tables, emb, parts.conditioner(32), config.concept_set), parts, config


@pytest.mark.parametrize("method", ["uce", "speed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_edit_moves_exactly_the_text_input_layers(bases, erased, family, method):
    part = DENOISER[family]
    out = erased[family, method]
    base, new = state(bases[family], part), state(out, part)
    changed = sorted(n for n in base if not torch.equal(base[n], new[n]))
    want = sorted(n for n in base if re.fullmatch(EXPECTED[method, part], n))
    assert want and changed == want
    cfg = json.loads((out / "erase_config.json").read_text())
    assert cfg["engine"]["max_train_steps"] == 0 and cfg["history"] == [] and cfg["data"]["forget"]["count"] == 0
    p = cfg["prepare"]
    assert p["closed_form"] and p["repair_steps"] == 0 and p["concepts"] == 1 and p["layers_edited"] == len(want)
    assert p["seconds_per_concept"] == pytest.approx(p["edit_seconds"]) and p["edit_seconds"] > 0
    assert sorted(load_file(str(out / f"{part}_delta.safetensors"))) == changed
    assert "closed form, no repair steps" in (out / "README.md").read_text()
    assert not (out / "data").exists()  # no image was generated


@pytest.mark.parametrize("family", ["sd3", "flux_dev"])
def test_the_view_reads_what_the_pipeline_encodes_at_each_last_word(bases, tmp_path, family):
    """Token-stream rows are the pipeline's own encoding, and each segment's last-word position holds the prompt's last
    token (CLIP's ``three</w>``, T5's ``▁three`` with a real vocabulary); a pooled row is the pooled vector."""
    v, parts, _ = view(bases[family], "three", "uce", tmp_path)
    f = v.features("forget", "tokens")
    packed = parts.text.encode(f.prompts, "cpu")
    assert torch.equal(f.values, packed[:, :-1].float())
    assert len(f.segments) == (2 if family == "sd3" else 1) and f.segments[-1][2] == f.values.shape[1]
    for i, prompt in enumerate(f.prompts):
        for s, ((tok, size), (start, _, _)) in enumerate(zip(parts.text.token_segments(), f.segments)):
            ids = tok(prompt, padding="max_length", max_length=size, truncation=True).input_ids
            assert tok.convert_ids_to_tokens(ids[int(f.last[i, s]) - start]) == tok.tokenize(prompt)[-1]
    pooled = v.features("preserve", "pooled")
    assert pooled.values.shape[1] == 1 and torch.equal(pooled.values[:, 0], parts.text.encode(pooled.prompts, "cpu")[:, -1, : pooled.values.shape[2]])


def test_uce_meets_its_closed_form_optimality_conditions(bases, erased, tmp_path):
    """The edited W minimises s_e Σ‖W c − W₀ a‖² + s_p Σ‖W p − W₀ p‖² + λ‖W − W₀‖²: its gradient vanishes, with the
    paper's scales and with none on the kept prompts; the forget inputs move towards the anchor's values (closer with
    nothing to keep), and the preserve term holds the kept prompts' values."""
    from erase.core.closed_form import aligned, rows

    v, _, _ = view(bases["sd1"], "three", "uce", tmp_path)
    forget, anchor = v.features("forget", "tokens"), v.features("anchor", "tokens")
    keep, empty = v.features("preserve", "tokens"), v.features("uncond", "tokens")
    pairs = [aligned(forget, i, anchor, forget.anchor[i], "last_onward") for i in range(len(forget))]
    c = torch.cat([p[0] for p in pairs]).double()
    a = torch.cat([p[1] for p in pairs]).double()
    p = torch.cat([rows(t, i, "every") for t in (empty, keep) for i in range(len(t))]).double()
    free = tmp_path / "free"
    run(["--pretrained_model_name_or_path", bases["sd1"], "--concept", "three", "--method", "uce", "--output_dir", free,
         "--preserve_scale", 0])
    base = state(bases["sd1"], "unet")
    names = [n for n in base if re.fullmatch(EXPECTED["uce", "unet"], n)]
    lamb, s_e = 0.5, 1.0
    moved = {}  # (run, layer) -> (erase residual after / before, relative change of the kept prompts' values)
    for out, s_p in ((erased["sd1", "uce"], max(0.1, 1 / (1 + len(keep)))), (free, 0.0)):
        new = state(out, "unet")
        for n in names:
            w0, w = base[n].double(), new[n].double()
            grad = lamb * (w - w0) + s_e * (w @ c.T - w0 @ a.T) @ c + s_p * (w @ p.T - w0 @ p.T) @ p
            scale = (w @ (lamb * torch.eye(w.shape[1]) + s_e * c.T @ c + s_p * p.T @ p)).norm()
            assert float(grad.norm() / scale) < 1e-5, n
            moved[s_p > 0, n] = (float((w @ c.T - w0 @ a.T).norm() / (w0 @ c.T - w0 @ a.T).norm()),
                                 float((w @ p.T - w0 @ p.T).norm() / (w0 @ p.T).norm()))
    for n in names:
        (kept_erase, kept_moved), (free_erase, free_moved) = moved[True, n], moved[False, n]
        # the concept's values move towards its anchor's (a least-squares fit: its aligned tokens outnumber the width),
        # closer with nothing to keep, and the preserve term holds the kept prompts' values
        assert free_erase < kept_erase < 0.8, (n, moved)
        assert kept_moved < 0.5 * free_moved, (n, moved)


def test_speed_edits_in_the_null_space_of_its_priors_and_keeps_the_null_text(bases, tmp_path):
    """Without augmentation the priors are the retain prompts' last word tokens: ΔW vanishes on every direction of their
    second moment at or above the threshold, and on the null text's first token (K₂, kept exactly with γ = 0)."""
    out = tmp_path / "o"
    run(["--pretrained_model_name_or_path", bases["sd1"], "--concept", "three", "--method", "speed", "--output_dir", out, "--aug_num", 0])
    v, _, _ = view(bases["sd1"], "three", "speed", tmp_path)
    keep, null, forget = v.features("preserve", "tokens"), v.features("uncond", "tokens"), v.features("forget", "tokens")
    from erase.core.closed_form import rows

    r = torch.cat([rows(keep, i, "last") for i in range(len(keep))]).double()
    evals, evecs = torch.linalg.eigh(r.T @ r / r.shape[0])
    span = evecs[:, evals >= 0.1]
    c = torch.cat([rows(forget, i, "last") for i in range(len(forget))]).double()
    base, new = state(bases["sd1"], "unet"), state(out, "unet")
    names = [n for n in base if re.fullmatch(EXPECTED["speed", "unet"], n)]
    assert 0 < span.shape[1] < r.shape[1]
    for n in names:
        dw = new[n].double() - base[n].double()
        assert dw.norm() > 0
        assert float((dw @ span).norm() / dw.norm()) < 1e-5, n  # the priors' span does not move
        assert float((dw @ null.values[0, 0].double()).norm() / (dw.norm() * null.values[0, 0].norm())) < 1e-5, n  # K₂
        assert float((dw @ c.T).norm() / (dw.norm() * c.norm())) > 1e-2, n  # the forget inputs do
    cfg = json.loads((out / "erase_config.json").read_text())
    assert {x["priors_kept"] for x in cfg["prepare"]["streams"]["tokens"]["layers"]} == {len(keep)}  # no filter without DPA


@pytest.mark.parametrize("method", ["uce", "speed"])
def test_several_concepts_are_one_edit(bases, tmp_path, method):
    out = tmp_path / "o"
    run(["--pretrained_model_name_or_path", bases["sd1"], "--concept", "three,five,eight", "--method", method, "--output_dir", out])
    cfg = json.loads((out / "erase_config.json").read_text())
    p = cfg["prepare"]
    assert p["concepts"] == 3 and p["seconds_per_concept"] == pytest.approx(p["edit_seconds"] / 3)
    assert [c["name"] for c in cfg["concepts"]] == ["three", "five", "eight"]
    n_forget = sum(len(c["forget_prompts"]) for c in cfg["concepts"])
    assert (p["streams"]["tokens"]["erase_pairs"] if method == "uce" else p["streams"]["tokens"]["targets"]) == n_forget
    assert not any(re.search(r"\b(three|five|eight|3|5|8)\b", q) for q in cfg["retain_prompts"])


@pytest.mark.parametrize("fmt", ["diffusers", "single_file", "lora", "delta"])
@pytest.mark.parametrize("family", ["sd1", "flux_dev"])
def test_every_export_loads_back(bases, erased, family, fmt):
    from erase import load_erased

    if family == "flux_dev" and fmt == "single_file":
        pytest.skip("the tiny Flux's single file has no diffusers config to load back by (tests/test_export_transformers.py)")
    out, part = erased[family, "uce"], DENOISER[family]
    pipe = load_erased(str(out), format=fmt)
    if fmt == "lora":
        pipe.fuse_lora()
    want, base = state(out, part), state(bases[family], part)
    got = {k.replace(".base_layer", ""): t for k, t in getattr(pipe, part).state_dict().items() if "lora_" not in k}
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    if fmt == "lora":  # the change truncated as erased_lora.json says
        rel = json.loads((out / "erased_lora.json").read_text())["rel_error"]
        full = torch.cat([(want[k] - base[k]).flatten() for k in changed])
        lora = torch.cat([(got[k].float() - base[k]).flatten() for k in changed])
        assert float((full - lora).norm() / full.norm()) <= rel + 1e-3
    else:
        assert all(torch.equal(got[k].float(), want[k]) for k in want)


@pytest.mark.parametrize("argv, words", [
    (["--method", "uce", "--max_train_steps", "5"], "--method uce is a closed-form edit with no repair steps: --max_train_steps must be 0"),
    (["--method", "speed", "--retain_loss", "data"], "--retain_loss data does not apply"),
    (["--method", "uce", "--lamb", "0"], "--lamb 0 is outside the allowed range > 0"),
    (["--method", "speed", "--null_threshold", "-1"], "--null_threshold -1 is outside the allowed range > 0"),
    (["--method", "uce", "--aug_num", "3"], "--aug_num is not an option of method uce (it belongs to speed)"),
])
def test_bad_closed_form_flags_are_one_line(bases, capsys, argv, words):
    from erase.sd import parse_args

    with pytest.raises(SystemExit) as err:
        parse_args(["--pretrained_model_name_or_path", bases["sd1"], "--concept", "three", *argv])
    msg = capsys.readouterr().err.strip()
    assert err.value.code == 2 and words in msg and "\n" not in msg, msg


def test_a_closed_form_edit_needs_a_text_input_layer_among_the_targets(bases, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        run(["--pretrained_model_name_or_path", bases["sd1"], "--concept", "three", "--method", "uce", "--output_dir", tmp_path / "o",
             "--targets", "selfattn"])
    msg = err.value.code if isinstance(err.value.code, str) else capsys.readouterr().err.strip()
    assert err.value.code not in (0, None) and "uce edits the text-input layers" in msg and "--targets xattn" in msg, msg


def test_the_engine_refuses_repair_steps_for_a_closed_form_method():
    from erase.core import EngineConfig, build_method
    from erase.core import run as engine_run

    with pytest.raises(ValueError, match="method speed is a closed-form edit with no repair steps; max_train_steps must be 0, got 3"):
        engine_run(None, build_method("speed", "diffusion"), EngineConfig(max_train_steps=3, progress=False))


@pytest.mark.parametrize("k, m", [(4, 10), (40, 10), (6, 60)])  # few erase rows / more than the width; priors fewer / more
def test_speeds_factored_delta_is_the_papers_formula(k, m):
    """speed_delta's push-through / Woodbury / small-Gram route gives the official script's ΔW, formed densely."""
    from types import SimpleNamespace

    from erase.core.methods.speed import dense_delta, speed_delta

    g = torch.Generator().manual_seed(k + m)
    d, n = 24, 3
    w = torch.randn(16, d, generator=g, dtype=torch.float64)
    c_rows, a_rows = torch.randn(k, d, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)
    priors = torch.randn(m, d, generator=g, dtype=torch.float64) * torch.linspace(0.01, 1, d, dtype=torch.float64)
    k2 = torch.randn(d, 2, generator=g, dtype=torch.float64)
    c, dd = c_rows / n**0.5, (a_rows - c_rows) / n**0.5
    if k > d:
        q, r = torch.linalg.qr(c)
        c, dd = r, q.T @ dd
    cfg = SimpleNamespace(aug_num=0, prior_filter=True, null_threshold=0.1, retain_scale=0.7, invariance_lamb=0.0)
    fast, facts = speed_delta(w, c, dd, priors, k2, cfg, g)
    slow = dense_delta(w, c_rows.T @ c_rows / n, a_rows.T @ c_rows / n, priors, k2, 0.1, 0.7, 0.0)
    torch.testing.assert_close(fast, slow, rtol=1e-7, atol=1e-9 * float(slow.abs().max()))
    assert float(slow.norm()) > 1e-3 * float(w.norm()) and 0 < facts["null_space_dim"] < d
    assert float((fast @ k2).norm()) < 1e-8 * float(fast.norm() * k2.norm())  # the null text kept exactly


@pytest.mark.parametrize("shape", [(16, 24), (24, 16), (20, 20)])
def test_speeds_augmentation_direction_is_the_least_right_singular_vector(shape):
    from erase.core.methods.speed import least_right_singular_vector

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64)
    v, ref = least_right_singular_vector(w), torch.linalg.svd(w, full_matrices=False).Vh[-1:]
    assert v.shape == (1, shape[1]) and float((v @ ref.T).abs()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", ["sd1", "flux_dev"])
def test_null_space_repair_keeps_the_preserved_prompts_inputs_to_text_layers(bases, family, tmp_path):
    """Scissorhands --null_space: the trim and every repair step (Adam's) change the text-input layers only off the span
    of the preserved prompts' inputs, so W x is the base's for every preserved x, while the layers still change; the
    projection's guarantee holds as before. Without it the same run moves W x there."""
    from erase.core.closed_form import positions

    part, base = DENOISER[family], bases[family]
    common = ["--pretrained_model_name_or_path", base, "--concept", "three", "--max_train_steps", 3, "--num_forget_images", 2,
              "--num_retain_images", 2, "--num_inference_steps", 2, "--train_batch_size", 1, "--topk", 20,
              "--export_dtype", "fp32"]
    run(common + ["--null_space", "--output_dir", tmp_path / "null"])
    run(common + ["--output_dir", tmp_path / "plain"])
    text_view, _, _ = view(base, "three", "scissorhands", tmp_path)
    f = text_view.features("preserve", "tokens")
    x = torch.cat([f.values[i, positions(f, i, "every")] for i in range(len(f))]).double()
    evals, evecs = torch.linalg.eigh(x.T @ x / x.shape[0])
    span = evecs[:, evals >= 0.01 * evals.max()]
    assert 0 < span.shape[1] < span.shape[0]
    before, null, plain = state(base, part), state(tmp_path / "null", part), state(tmp_path / "plain", part)
    layers = [n for n in before if re.fullmatch(r".*\.attn2\.to_[kv]\.weight|context_embedder\.weight", n)]
    assert layers
    for n in layers:
        moved, moved_plain = (null[n] - before[n]).double(), (plain[n] - before[n]).double()
        assert moved.norm() > 0 and (moved @ span).norm() <= 1e-5 * moved.norm(), n
        assert (moved_plain @ span).norm() > 0.1 * moved_plain.norm(), n
    cfg = json.loads((tmp_path / "null" / "erase_config.json").read_text())
    assert cfg["method_config"]["null_space"] is True
    assert set(cfg["prepare"]["null_space"]["layers"]) == {n.rsplit(".", 1)[0] for n in layers}
    assert cfg["repair"]["update_violated_after"] == 0 and cfg["repair"]["update_checked"] == 3
