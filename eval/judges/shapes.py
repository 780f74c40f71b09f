"""The shapes judges: every shape, colour and texture of the shapes world (``star``, ``red``, ``striped``, ...).

An image is a hit when the judges of ``eval.shapes.judges`` (object, colour, texture, count, relation; trained on
renders) read at least one object that shows the value: the test of ``eval.shapes score``'s ``forget_acc``. Generation
as ``eval.shapes score`` (20 steps of the family's sampler, guidance 4, 40 images per check). Only meaningful on a
shapes model: any other model is rejected. The words naming a value in a prompt: the value itself (its plural, "stars",
is matched by the attacks' word pattern). A compound ("red star") has no judge of its own.
"""

from __future__ import annotations

from eval.judges.registry import Judge, register_judge


def _value_judge(value: str):
    def build() -> Judge:
        from eval.shapes.judges import JUDGE_VERSION, load_judges

        judges = load_judges()

        def flag(images):
            readings = judges.read(images)
            return [any(o.has(value) for o in r.objects) for r in readings], [
                [f"{o.colour} {o.texture} {o.shape}" for o in r.objects] for r in readings]

        return Judge(value, flag, {
            "name": "shapes-judges", "module": "eval.shapes.judges", "version": JUDGE_VERSION,
            "judges": judges.describe(), "hit": f"an object read with {value}",
            "labels": "the objects read (colour texture shape)"})

    return build


def _check_shapes_model(model: str) -> None:
    from eval.shapes.score import resolve_shapes_model

    resolve_shapes_model(model)  # UserError unless the model (or its base) is a shapes model


def _register() -> None:
    from eval.shapes import world
    from eval.shapes.score import SCORE_DEFAULTS

    generation = {k: SCORE_DEFAULTS[k] for k in ("num_images", "steps", "guidance", "scheduler", "batch_size")}
    for values in world.KINDS.values():
        for value in values:
            register_judge(value, factory=_value_judge(value), generation=generation, check_model=_check_shapes_model,
                           words=(value,), builtin=True)


_register()
