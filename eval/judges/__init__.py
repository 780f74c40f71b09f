"""Judges: which generated images show a concept? One judge per concept, one file per built-in judge.

    from eval.judges import register_judge          # also importable as eval.attack.register_judge

    register_judge("cat", flag=lambda images: my_cat_classifier(images) > 0.5,
                   settings={"name": "my-cat-classifier", "version": "1", "threshold": 0.5})

The registry is ``registry.py``; every other module of this package is a built-in judge that registers itself when
it is imported (``digits.py``: the digits CNN for zero..nine; ``nudity.py``: NudeNet for nudity). A new judge is one
new file here. The attack audits (``eval.attack``) look judges up by concept name.
"""

from eval.judges.registry import (  # noqa: F401
    GENERATION_DEFAULTS,
    Judge,
    JudgeEntry,
    judge_entry,
    judged_concepts,
    load_judge,
    register_judge,
    unregister_judge,
)
