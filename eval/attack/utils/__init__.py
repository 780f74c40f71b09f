"""The pieces every attack shares, one module per concern (as accelerate's ``utils/``):

- ``config``:  ``AttackConfig`` (model, concept, prompts, audit generation, protocol, output folder) and the CLI
               generated from config dataclasses; ``ConceptImagesConfig`` for attacks that learn from images.
- ``models``:  resolving an attacked model over its base, loading it (finite weights only), its text stack.
- ``prompts``: the prompts an audit draws from; ``words``: the words that name a concept (stripped, replaced).
- ``checks``:  drawing check images with held-out seeds and judging them.
- ``images``:  the images of the concept an attack learns from (drawn by the base model, judged, encoded once).
- ``losses``:  the noise-prediction target, endless batches, a fixed batch of noisy latents for comparable losses.
- ``tokens``:  token vocabularies, prompt ids and the token-embedding override of the text encoder.
- ``records``: the start of a run (``begin``), resumable cell files, artefacts beside their settings, versions.
- ``columns``: a bench table's robustness columns (``--attacks``: one budget per table, gaps to the retrain reference).
"""
