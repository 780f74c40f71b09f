"""benchmarks/gpu_figures.py (run by benchmarks/gpu.sh on a GPU) in its smoke mode on the CPU: one UNet family (SD v1.4)
and one MMDiT family (FLUX.1-dev) at tiny widths, every kind of row, and the arithmetic of what it derives."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_figures
from benchmarks.architectures import SMOKE_ARCHS
from erase.utils.errors import UserError

PIECES = ["repair:sd14:b1", "repair:flux_dev:b1:ckpt", "generation:sd14", "generation:flux_dev", "attacks:sd14"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "figures.json"
    returned = gpu_figures.main(["--smoke", "--only", *PIECES, "--output", str(out)])
    written = json.loads(out.read_text())
    assert written["pieces"] == json.loads(json.dumps(returned["pieces"]))  # the file holds what the run returned
    return written


def test_every_selected_piece_ran_in_order_with_its_plan(smoke):
    assert smoke["mode"] == "smoke" and smoke["device"] == "cpu"
    in_order = [p for p in gpu_figures.PIECES if p in PIECES]  # the run's order (MMDiT rows first), not the command's
    assert list(smoke["pieces"]) == in_order and in_order[0] == "repair:flux_dev:b1:ckpt"
    assert all(p["status"] == "done" and p["seconds"] > 0 and p["planned_s"] > 0 for p in smoke["pieces"].values())
    plan = smoke["plan"]
    assert list(plan["pieces"]) == in_order and plan["total_s"] == pytest.approx(plan["startup_s"] + sum(plan["pieces"].values()))
    assert sorted(smoke["archs"]) == ["flux_dev", "sd14"]
    flux = smoke["archs"]["flux_dev"]["flops_at_batch_1"]
    assert flux["denoiser_forward"] > 0 and flux["denoiser_parameters"] == sum(
        p.numel() for p in __import__("diffusers").FluxTransformer2DModel(**SMOKE_ARCHS["flux_dev"].denoiser).parameters())


@pytest.mark.parametrize("arch, label, objective", [("sd14", "b1", "ddpm"), ("flux_dev", "b1:ckpt", "flow")])
def test_repair_rows_run_the_default_recipe_with_the_run_placement(smoke, arch, label, objective):
    row = smoke["archs"][arch]["repair"][label]
    assert row["batch"] == 1 and row["gradient_checkpointing"] == label.endswith("ckpt")
    assert row["method"] == "scissorhands" and row["targets"] == "xattn" and row["retain_loss"] == "distill"
    assert row["method_options"] == {"forget_loss": "redirect", "lam": 0.3, "topk": 2.0}
    assert row["method_config"]["saliency_batches"] == 4 and row["method_config"]["project"] is True
    assert row["objective"]["objective"] == objective and row["resolution"] == SMOKE_ARCHS[arch].resolution
    assert row["steps_timed"] == 1 and len(row["step_seconds"]) == 2 and row["s_per_step"] == row["step_seconds"][1] > 0
    assert row["prepare_s"] > 0 and "oom" not in row
    # load.place under bf16: the targets stay fp32 masters, every other denoiser weight is bf16
    n, k = row["denoiser_parameters"], row["targeted_parameters"]
    assert 0 < k < n and row["targeted_dtypes"] == {"float32": k} and row["parameter_dtypes"] == {"bfloat16": n - k, "float32": k}


def test_mmdit_rows_carry_the_memory_plan_of_the_real_model(smoke):
    from benchmarks.memory_plan import plan

    row = smoke["archs"]["flux_dev"]["repair"]["b1:ckpt"]
    real = plan("flux_dev", batch=1, resolution=1024)
    assert row["expected_gib"] == pytest.approx(real["total_gib"]) and row["expected_trim_peak_gib"] == pytest.approx(real["trim_peak_gib"])
    assert row["expected_allocated_gib"] == pytest.approx(real["total_gib"] - real["bytes"]["CUDA context and allocator slack (est.)"] / 2**30)
    assert "expected_gib" not in smoke["archs"]["sd14"]["repair"]["b1"]  # the memory plan covers the MMDiT models only


@pytest.mark.parametrize("arch, sampler, steps, guidance, passes", [("sd14", "lms", 50, 7.5, 2), ("flux_dev", "flow_euler", 28, 3.5, 1)])
def test_generation_rows_fit_a_line_through_two_calls(smoke, arch, sampler, steps, guidance, passes):
    g = smoke["archs"][arch]["generation"]
    assert (g["sampler"], g["steps"], g["guidance"], g["passes_per_step"], g["data_steps"]) == (sampler, steps, guidance, passes, 50)
    assert g["batch"] == 2 and g["steps_timed"] == [1, 2] and len(g["seconds"]) == 2 and g["per_step_s"] > 0
    if g["fit"] == "line through the two calls":
        assert g["per_step_s"] == pytest.approx(g["seconds"][1] - g["seconds"][0])
    assert g["fixed_s"] == pytest.approx(g["seconds"][1] - 2 * g["per_step_s"])
    assert sorted(g["seconds_per_image_at"], key=int) == sorted({str(steps), "50"}, key=int)
    for n, s in g["seconds_per_image_at"].items():
        assert s == pytest.approx((g["fixed_s"] + int(n) * g["per_step_s"]) / 2) and g["images_per_s_at"][n] == pytest.approx(1 / s)
    assert g["images_per_s"] == g["images_per_s_at"][str(steps)]


@pytest.mark.parametrize("arch, label", [("sd14", "b1"), ("flux_dev", "b1:ckpt")])
def test_the_erasure_estimate_adds_up(smoke, arch, label):
    entry = smoke["archs"][arch]
    est, row, gen = entry["erasure_estimate"], entry["repair"][label], entry["generation"]
    assert est["complete"] and est["repair_row"] == label  # without a b1 row lacking checkpointing, the checkpointed one
    assert est["assumes"] == {"forget_images": 100, "data_steps": 50, "repair_steps": 100, "train_batch_size": 1}
    assert est["data_generation_s"] == pytest.approx(100 * gen["seconds_per_image_at"]["50"])
    assert est["trim_s"] == row["prepare_s"] and est["repair_s"] == pytest.approx(100 * row["s_per_step"])
    assert est["total_s"] == pytest.approx(est["data_generation_s"] + est["trim_s"] + est["repair_s"])
    assert est["total_minutes"] == pytest.approx(est["total_s"] / 60) and est["peak_gpu_gib"] is None  # no GPU here
    assert (est.get("target_minutes"), est.get("target_gib")) == ((5, 24) if arch == "sd14" else (None, None))


def test_the_attack_costs_follow_from_the_measured_passes(smoke):
    a = smoke["attacks"]
    b = a["budget"]
    assert (b["prompts"], b["restarts"], b["iterations"], b["judge_steps"]) == (142, 4, 40, 50)  # eval/protocols.py's protocol
    assert sorted(a["iteration_s"], key=int) == ["1", "4"] == sorted(a["unet_forward_backward_s"], key=int)
    assert all(v > 0 for v in [*a["iteration_s"].values(), *a["unet_forward_backward_s"].values(), a["selection_forward_s"]])
    unit = a["unlearndiffatk_unit"]
    assert unit["optimisation_s"] == pytest.approx(40 * a["iteration_s"]["4"])
    assert unit["selection_s"] == pytest.approx(41 * 4 * a["selection_forward_s"])
    assert unit["judging_s"] == pytest.approx((4 * 5 + 3) * 50 * 2 * a["selection_forward_s"] / 8)
    assert unit["total_s"] == pytest.approx(unit["optimisation_s"] + unit["selection_s"] + unit["judging_s"])
    assert a["protocol"]["gpu_hours"] == pytest.approx(142 * unit["total_s"] / 3600)
    assert a["protocol"]["unet_passes"]["forward_backward"] == 142 * 40 * 4
    assert a["reference_budget"]["gpu_hours"] == pytest.approx(142 * 2000 * a["iteration_s"]["1"] / 3600)
    assert a["inversion"]["seed_s"] == pytest.approx(2000 * a["iteration_s"]["4"])
    assert a["iteration_over_bare_unet"]["4"] == pytest.approx(a["iteration_s"]["4"] / a["unet_forward_backward_s"]["4"])


def test_pieces_are_chosen_by_pattern_and_a_bad_one_is_one_line(tmp_path):
    assert gpu_figures.select(["repair:*:b1"], ["repair:sd*"]) == ["repair:flux_dev:b1"]
    assert gpu_figures.select(None, ["repair:*", "generation:*", "memory_plan"]) == ["attacks:sd14", "detection"]
    with pytest.raises(SystemExit, match=r"^error: --only 'repair:sd3:\*' matches no piece; pieces: repair:sd35_medium:b1:ckpt, ") as err:
        gpu_figures.main(["--smoke", "--only", "repair:sd3:*", "--output", str(tmp_path / "x.json")])
    assert "\n" not in str(err.value) and not (tmp_path / "x.json").exists()
    with pytest.raises(UserError, match="--budget_s must be > 0"):
        gpu_figures.main.__wrapped__(["--smoke", "--budget_s", "-1", "--output", str(tmp_path / "x.json")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_only_the_smoke_mode_runs(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: no CUDA GPU .*use --smoke"):
        gpu_figures.main(["--output", str(tmp_path / "x.json")])


def test_a_piece_over_the_budget_is_skipped_and_resume_runs_it(tmp_path):
    out = tmp_path / "figures.json"
    gpu_figures.main(["--smoke", "--only", "generation:sd14", "--budget_s", "1e-6", "--output", str(out)])
    first = json.loads(out.read_text())
    assert first["pieces"]["generation:sd14"]["status"].startswith("skipped: planned")
    assert "generation" not in first["archs"]["sd14"] and not first["archs"]["sd14"]["erasure_estimate"]["complete"]
    gpu_figures.main(["--smoke", "--only", "generation:sd14", "detection", "--resume", "--output", str(out)])
    again = json.loads(out.read_text())
    assert again["pieces"]["generation:sd14"]["status"] == "done" and again["archs"]["sd14"]["generation"]["images_per_s"] > 0
    det = again["detection"]  # a piece the first run did not select
    assert again["pieces"]["detection"]["status"] == "done" and det["images"] == 4 and det["images_per_s"] > 0
    assert det["detector"] == "nudenet" and "CPUExecutionProvider" in det["providers"]
    assert again["date"] == first["date"] and " ; " in again["command"]  # the same run, finished
    with pytest.raises(UserError, match=r"--resume: .* holds a 'smoke' run, this is a 'gpu' run"):
        gpu_figures._start(out, SimpleNamespace(resume=True), "gpu", gpu_figures.SETTINGS["gpu"], torch.device("cpu"), [], {})


def test_an_out_of_memory_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import erase.core

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(erase.core, "run", oom)  # the engine, as the repair row imports it
    out = tmp_path / "figures.json"
    gpu_figures.main(["--smoke", "--only", "repair:flux_dev:b1", "generation:flux_dev", "--output", str(out)])
    got = json.loads(out.read_text())
    row = got["archs"]["flux_dev"]["repair"]["b1"]
    assert row["oom"] is True and row["oom_in"] == "repair" and row["error"].startswith("CUDA out of memory")
    assert "s_per_step" not in row and got["pieces"]["repair:flux_dev:b1"]["status"] == "oom"
    assert got["pieces"]["generation:flux_dev"]["status"] == "done"  # the next piece still ran
    assert got["archs"]["flux_dev"]["erasure_estimate"] == {"complete": False, "missing": ["repair row at batch 1"],
                                                           "assumes": got["archs"]["flux_dev"]["erasure_estimate"]["assumes"]}
