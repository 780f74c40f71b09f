"""Attack audits: does an erased concept come back? ``python -m eval.attack --attack NAME ...`` (docs/ATTACK.md).

Public API: ``register_attack`` / ``available_attacks`` (one module per attack in this package, found at first use),
``register_judge`` / ``judged_concepts`` / ``load_judge`` (one judge per concept; built-ins in ``judges.py``), and
``relearn_audit(model_dir, concept, output_dir, **options)`` for in-process use (e.g. by the digits benchmark).
"""

from eval.attack import judges  # noqa: F401  (registers the built-in judges)
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
