"""Attack audits: does an erased concept come back? ``python -m eval.attack --attack NAME ...`` (docs/ATTACK.md).

Layout: ``registry.py`` (attacks by name; the judge names re-exported from ``eval/judges``), one module per attack
(``relearn.py``, ``unlearndiffatk.py``, ``inversion.py``: found at first use), ``replay.py`` (apply what an attack
learned to another model: ``python -m eval.attack --replay DIR --model M``), and ``utils/`` (what every attack
shares, one module per concern).

Public API: ``register_attack`` / ``available_attacks``, ``register_judge`` / ``judged_concepts`` / ``load_judge``,
and ``relearn_audit(model_dir, concept, output_dir, **options)`` for in-process use (e.g. by the digits benchmark).
"""

from eval.attack.registry import (  # noqa: F401
    Judge,
    available_attacks,
    get_attack,
    judged_concepts,
    load_judge,
    register_attack,
    register_judge,
    unregister_judge,
)
from eval.attack.relearn import RelearnConfig, relearn_audit  # noqa: F401
