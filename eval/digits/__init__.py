"""The digits benchmark: a concept erasure anyone can run and check on a laptop CPU.

    python -m eval.digits train --output_dir DIR          # tiny SD-format text-to-image model of digits (cached)
    python -m eval.digits train --denoiser sd3            # the same as an SD3-kind transformer, rectified flow (cached)
    python -m eval.digits retrain --digits three          # the same model trained without the digit's images (cached)
    python -m eval.digits score --model M --concept three --output_dir OUT
    python -m eval.digits bench --concept three --methods scissorhands,esd,salun,ga,ft --seeds 0,1,2 --output_dir OUT

``score`` generates images for the erased digit's prompts and for every other digit's prompts through
``erase.diffusion.generate`` (the same code as the SD v1.4 audits), asks the judge (``eval.digits.judge``, a CNN trained on
real digits) which digit each image shows, and writes ``OUT/summary.json``: ``forget_acc`` (share of the erased
digit's generations the judge calls that digit), ``retain_acc`` (share of the other digits' generations called
their own digit, pooled), per-digit accuracies, the Fréchet distance of the retain generations to real digits
in the judge's feature space, the same under held-out phrasings, and every setting.
"""
