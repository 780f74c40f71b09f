"""The names an attack module uses, in one import (kept for code written against the old single module).

The pieces live in ``eval/attack/utils/``, one module per concern; new code imports them from there."""

from eval.attack.utils.checks import (  # noqa: F401
    CHECK_SEED_OFFSET,
    PASS_RATE,
    check_seeds,
    draw,
    first_step_over,
    image_pixels,
    judge_images,
    save_pngs,
)
from eval.attack.utils.config import (  # noqa: F401
    AttackConfig,
    ConceptImagesConfig,
    add_config_args,
    int_list,
    optional_number,
    str_list,
)
from eval.attack.utils.images import ConceptImages, concept_images  # noqa: F401
from eval.attack.utils.losses import endless_batches, noise_target  # noqa: F401
from eval.attack.utils.models import (  # noqa: F401
    ModelInfo,
    load_attacked,
    pipeline_text,
    require_one_text_encoder,
    resolve_model,
)
from eval.attack.utils.prompts import ConceptPrompts, concept_prompts  # noqa: F401
from eval.attack.utils.records import AttackSetup, begin, read_cell, versions  # noqa: F401
from eval.attack.utils.tokens import TokenEmbeddingOverride  # noqa: F401
from eval.attack.utils.words import concept_words, names_concept, remove_words, replace_words  # noqa: F401
