"""Write tests/data/legacy/: what erase/sd.py produced before the run became a config and stages (issue 16).

Run once on the commit before the refactor (a5c2219), from a checkout of it:

    OMP_NUM_THREADS=1 python tests/data/make_legacy_reference.py tests/data/legacy

(The references were remade on 2026-12-07 from a checkout of a898d37, which is a5c2219's code plus this script, on a
host whose kernels gave other bits than the first one's, with this file's ``kernel_fingerprint`` added to each; a
host with another fingerprint compares them within float rounding, checked against the first references.)

For each case it builds the tiny pipeline of tests/conftest.py (eval.tiny, seed 0), runs erase/sd.py in-process with
the case's flags and writes ``<case>.json``: every changed UNet tensor's sha256 and float64 sum / sum of squares (with
the torch version and a fingerprint of the CPU kernels that made them: bitwise equality is only promised on kernels
that give the same bits; two hosts that both report AVX512 did not), the
per-tensor trim counts, the projection counters, the loss history and the settings a resume compares (the ``record``
of the run's checkpoint, temporary paths replaced by ``<base>`` / ``<data>``).
tests/test_legacy_reference.py reruns every case with today's code and compares.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SMALL = ["--num_forget_images", "4", "--num_retain_images", "4", "--num_inference_steps", "2", "--generation_batch_size", "4",
         "--log_every", "1"]
CASES = {
    # name: (family, flags)
    "sd1_scissorhands": ("sd1", ["--concept", "nudity", "--saliency_batches", "2", "--max_train_steps", "4",
                                 "--train_batch_size", "2", "--lr", "1e-3", "--topk", "20"]),
    "sd1_two_concepts": ("sd1", ["--concept", "nudity,van_gogh", "--saliency_batches", "2", "--max_train_steps", "3",
                                 "--train_batch_size", "2", "--lr", "1e-3", "--num_memories", "2"]),
    "sd1_esd": ("sd1", ["--concept", "van_gogh", "--method", "esd", "--max_train_steps", "2", "--lr", "1e-3",
                        "--esd_ddim_steps", "4"]),
    "sd1_salun_both": ("sd1", ["--concept", "church", "--method", "salun", "--max_train_steps", "2", "--lr", "1e-3",
                               "--retain_loss", "both", "--saliency_batches", "2", "--train_batch_size", "2"]),
    "sd1_ft_data": ("sd1", ["--concept", "parachute", "--method", "ft", "--max_train_steps", "2", "--lr", "1e-3"]),
    "sdxl_scissorhands": ("sdxl", ["--concept", "nudity", "--saliency_batches", "2", "--max_train_steps", "3",
                                   "--train_batch_size", "2", "--lr", "1e-3", "--topk", "10"]),
}


def run_case(name: str, family: str, flags: list[str], work: Path, pipes: dict) -> tuple[dict, dict, dict]:
    from erase.sd import main, parse_args
    from eval.tiny import build_tiny_pipeline

    if family not in pipes:
        # the tiny SDXL of the reference's day: two text encoders of equal width (half of cross_attention_dim 32)
        extra = {"sdxl_first_width": 16} if family == "sdxl" else {}
        pipes[family] = build_tiny_pipeline(work / f"tiny-{family}", family=family, **extra)
    base = pipes[family]
    out = work / name
    steps = int(flags[flags.index("--max_train_steps") + 1])
    args = ["--pretrained_model_name_or_path", base, "--output_dir", str(out), *SMALL, *flags,
            "--checkpointing_steps", str(max(1, steps - 1))]
    main(parse_args(args))
    from safetensors.torch import load_file

    delta = load_file(str(out / "unet_delta.safetensors"))
    state = json.loads((out / f"checkpoint-{max(1, steps - 1)}" / "erase_state.json").read_text())
    config = json.loads((out / "erase_config.json").read_text())
    text = json.dumps(state["record"]).replace(str(out / "data"), "<data>").replace(str(base), "<base>")
    facts = {"record": json.loads(text), "repair": config["repair"], "flags": args[4:],
             "trim_reset": {n: s["reset"] for n, s in ((config.get("prepare") or {}).get("trim") or {}).get("per_tensor", {}).items()},
             "history_loss": [row["loss"] for row in config["history"]]}
    return delta, facts, {"family": family}


def kernel_fingerprint() -> str:
    """sha256 of a small UNet's forward and backward and of a large matmul on fixed inputs, at the current thread
    count: two machines with equal fingerprints run the cases' kernels to the same bits (the CPU capability alone does
    not tell: the references of 2026-12-06 and a host of 2026-12-07 both report AVX512 and differ in every tensor)."""
    import hashlib

    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                    cross_attention_dim=16, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        x, c, a = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(256, 256)
    out = unet(x, torch.tensor([10, 500]), c).sample
    out.square().mean().backward()
    h = hashlib.sha256(out.detach().numpy().tobytes() + (a @ a).numpy().tobytes())
    for _, q in sorted(unet.named_parameters()):
        h.update(q.grad.numpy().tobytes())
    return h.hexdigest()


def tensor_facts(tensors: dict) -> dict:
    """Per tensor: sha256 of its bytes, float64 sum and sum of squares (what tests/test_legacy_reference.py compares)."""
    import hashlib

    return {n: {"sha256": hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest(), "sum": float(t.double().sum()),
                "sumsq": float(t.double().square().sum()), "shape": list(t.shape)} for n, t in sorted(tensors.items())}


def main(out_dir: str) -> None:
    import subprocess

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    pipes: dict = {}
    kernels = kernel_fingerprint()  # the machine's, once
    with tempfile.TemporaryDirectory() as tmp:
        for name, (family, flags) in CASES.items():
            delta, facts, meta = run_case(name, family, flags, Path(tmp), pipes)
            meta.update(commit=commit, torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
                        kernels=kernels)
            facts["delta"] = tensor_facts(delta)
            (out / f"{name}.json").write_text(json.dumps({**facts, **meta}, indent=1, sort_keys=True) + "\n")
            print(name, len(delta), "tensors")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent / "legacy"))
