"""Utility of a (possibly erased) model on harmless prompts: CLIP score and FID.

    python -m eval.utility --model M --prompts_csv coco.csv --reference REF_DIR --output_dir DIR [--limit 1000]

Generates one image per caption row (erase.diffusion.generate protocol) into DIR/images, then writes DIR/utility.json:
- CLIP score (Hessel et al. 2021, CLIPScore without the 2.5 rescale): cosine of CLIP image and text
  embeddings, clipped at 0, averaged; reported as 0-1 and x100. Model: transformers CLIP,
  default openai/clip-vit-large-patch14.
- FID (Heusel et al. 2017) of the generated images against the reference folder, with torchmetrics'
  FrechetInceptionDistance. `--fid_features inception` (default) uses the standard Inception-v3 features
  (needs torch-fidelity and its weight download); `--fid_features clip` uses the CLIP image embeddings of
  `--clip_model` (FID_CLIP, Kynkaanniemi et al. 2023), which needs no extra package, and is what the offline
  tests run with a tiny random CLIP.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from erase.utils.images import header_problem, MAX_PIXELS
from erase.utils.checks import check_numbers
from erase.utils.folders import hold_output_dir
from erase.utils.errors import cli_errors, OneLineParser, UserError
from erase.utils.files import atomic_write_json
from erase.utils.images import list_inputs
from erase.utils.launch import setup_logging
from erase.diffusion.generate import add_generation_args, check_rows, config_from_args, generate
from eval.models import load_for

logger = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
FID_SIZE = 299


def load_clip(name: str, device=None):
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name).eval()
        processor = CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the CLIP model {name!r}: {str(e).strip().splitlines()[0]}") from None
    return model.to(device or "cpu"), processor


def _features(output):
    """transformers 5 returns a model output from get_*_features; older versions return the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(images, prompts, model, processor, batch_size: int = 32) -> dict:
    """Mean over pairs of max(cos(image, text), 0); also per image."""
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(images), batch_size):
        inputs = processor(text=list(prompts[i : i + batch_size]), images=images[i : i + batch_size],
                           return_tensors="pt", padding=True, truncation=True,
                           max_length=model.config.text_config.max_position_embeddings)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        img = _features(model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _features(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).clamp(min=0)
        scores += cos.cpu().tolist()
    mean = sum(scores) / len(scores) if scores else float("nan")
    return {"clip_score": mean, "clip_score_x100": 100 * mean, "per_image": scores}


class ClipImageFeatures(torch.nn.Module):
    """FID feature extractor on CLIP image embeddings: uint8 (N, 3, H, W) -> (N, D)."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        self.num_features = model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        arrays = [im.permute(1, 2, 0).cpu().numpy() for im in images]
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(next(self.model.parameters()).device)
        return _features(self.model.get_image_features(pixel_values=pixels)).float()


def inception_features():
    """torchmetrics' Inception-v3 FID features; one clear line when torch-fidelity or its weights are missing."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=2048)
    except ModuleNotFoundError:
        raise UserError("FID with Inception features needs torch-fidelity (pip install torch-fidelity); "
                        "or pass --fid_features clip") from None
    except Exception as e:  # the weight download (github release) fails offline
        raise UserError(f"could not get the FID Inception-v3 weights ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); "
                        "run once online to cache them, or pass --fid_features clip") from None


def load_images(folder, size: int | None = None):
    """(list of RGB PIL images, names, skipped) from a folder; unreadable files are skipped and listed."""
    from PIL import Image

    paths, skipped = list_inputs(folder)
    images, names = [], []
    for p in paths:
        problem = header_problem(p, MAX_PIXELS)  # the pixel limit before any decoding
        if problem:
            skipped.append({"file": p.name, "reason": problem})
            continue
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
        except (OSError, ValueError):
            skipped.append({"file": p.name, "reason": "unreadable image"})
            continue
        images.append(im.resize((size, size), Image.BICUBIC) if size else im)
        names.append(p.name)
    return images, names, skipped


def fid(generated, reference, metric, batch_size: int = 32) -> float:
    """FID between two lists of PIL images with a torchmetrics FrechetInceptionDistance `metric`."""
    import numpy as np

    if len(generated) < 2 or len(reference) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(generated)} generated and {len(reference)} reference")
    for images, real in ((reference, True), (generated, False)):
        for i in range(0, len(images), batch_size):
            batch = np.stack([np.asarray(im.resize((FID_SIZE, FID_SIZE))) for im in images[i : i + batch_size]])
            metric.update(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous(), real=real)
    return float(metric.compute())


def make_fid_metric(kind: str, clip=None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if kind == "inception":
        return inception_features()
    if kind == "clip":
        return FrechetInceptionDistance(feature=ClipImageFeatures(*clip))
    raise UserError(f"unknown --fid_features {kind!r}; choose inception or clip")


def evaluate(images, prompts, reference_dir, clip_model: str = DEFAULT_CLIP, fid_features: str = "inception",
             batch_size: int = 32, device=None) -> dict:
    clip = load_clip(clip_model, device)
    metric = make_fid_metric(fid_features, clip)  # fail early, before scoring
    reference, _, ref_skipped = load_images(reference_dir)
    scores = clip_score(images, prompts, *clip, batch_size=batch_size)
    return {
        "images": len(images),
        "reference_images": len(reference),
        "reference_skipped": ref_skipped,
        "clip_score": scores["clip_score"],
        "clip_score_x100": scores["clip_score_x100"],
        "fid": fid(images, reference, metric, batch_size),
        "settings": {"clip_model": clip_model, "fid_features": fid_features, "fid_input_size": FID_SIZE,
                     "reference": str(reference_dir)},
    }


@cli_errors
def parse_args(input_args=None):
    parser = OneLineParser(description="CLIP score and FID of a model on caption prompts.")
    add_generation_args(parser)
    parser.add_argument("--prompts_csv", required=True, help="Caption table (prompt, evaluation_seed), e.g. coco_10k.csv.")
    parser.add_argument("--reference", required=True, help="Folder of reference images for FID.")
    parser.add_argument("--output_dir", required=True, help="Where images/ and utility.json go.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N captions.")
    parser.add_argument("--clip_model", default=DEFAULT_CLIP, help="CLIP model for the CLIP score (and FID_CLIP).")
    parser.add_argument("--fid_features", default="inception", choices=("inception", "clip"), help="FID feature space.")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output_dir this tool did not create.")
    args = parser.parse_args(input_args)
    check_numbers(args)
    if not Path(args.reference).is_dir():
        raise UserError(f"reference folder not found: {args.reference}")
    args.generation = config_from_args(args)
    return args


@cli_errors
def main(args):
    from erase.utils.launch import make_accelerator
    from erase.diffusion.prompt_table import load_prompts

    accelerator = make_accelerator()
    setup_logging(accelerator.is_main_process)
    table = load_prompts(args.prompts_csv, "all", args.limit, need_guidance=args.generation.guidance == "row")
    check_rows(table.rows, args.generation)  # inputs before outputs
    if accelerator.is_main_process:
        make_fid_metric(args.fid_features, load_clip(args.clip_model) if args.fid_features == "clip" else None)
    with hold_output_dir(args.output_dir, overwrite=args.overwrite, by="eval.utility", base=args.model,
                         base_what="the audited model"):
        return _evaluate(args, accelerator, table)


def _evaluate(args, accelerator, table):
    """Generate and score into the held output folder."""
    accelerator.wait_for_everyone()  # no process writes into the folder before the main one holds it
    images_dir = Path(args.output_dir) / "images"
    records = generate(table.rows, images_dir, args.generation, accelerator, pipe=load_for(args.generation, accelerator))
    result = None
    if accelerator.is_main_process:
        from PIL import Image

        images = [Image.open(images_dir / r["file"]).convert("RGB") for r in records]
        result = evaluate(images, [r["prompt"] for r in records], args.reference, args.clip_model,
                          args.fid_features, device=accelerator.device)
        result["settings"]["generation"] = {**_generation_settings(images_dir), **table.describe()}
        atomic_write_json(Path(args.output_dir) / "utility.json", result)
        logger.info("CLIP score %.4f (x100 %.2f), FID %.3f over %d images", result["clip_score"],
                    result["clip_score_x100"], result["fid"], result["images"])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _generation_settings(images_dir) -> dict:
    from erase.utils.files import read_json

    return read_json(Path(images_dir) / "generation.json", "generation manifest").get("settings", {})


if __name__ == "__main__":
    main(parse_args())
