"""The shapes benchmark: an offline compositional text-to-image world with exact ground truth (issue 19).

    python -m eval.shapes train                          # SD-format model of the world, CLIP's vocabulary (cached)
    python -m eval.shapes retrain --concepts star        # the same settings trained without every star scene (cached)
    python -m eval.shapes score --model M --concept star --output_dir OUT
    python -m eval.shapes bench --concept star --methods scissorhands,esd --seeds 0,1,2 --output_dir OUT
    python -m eval.shapes quickstart                     # train if absent, erase star, audit, table, chart, grids

Scenes of 1-3 objects (14 shapes in look-alike pairs, 11 colours, 5 textures, 3 backgrounds, counts, relations) are
rendered exactly (``world``, ``render``); prompts use SD's own CLIP BPE tokenizer (``tokenizer``); five judges
trained on renders read generations (``judges``); ``score`` writes forget, neighbour, co-occurrence, composition
and retain columns with every setting. See docs/SHAPES.md.
"""
