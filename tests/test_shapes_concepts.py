"""The shapes world's concepts (eval/shapes/world.py, concepts.py): phrasings split, names checked, several concepts
at once (many:N, pairs:N), compound concepts ("red star": one object both red and a star), and the tuning rule of
benchmarks/shapes_tune.py. Pure functions: no model, no judge."""

from __future__ import annotations

import json
import re

import pytest


def test_captions_name_the_scene_and_heldout_phrasings_are_disjoint():
    from eval.shapes import concepts, world

    scenes = world.training_scenes(400, 5)
    for s in scenes:
        train, held = world.captions(s, "train"), world.captions(s, "heldout")
        assert train and held and not set(train) & set(held)
        for c in train + held:
            words = c.split()
            assert all(o.shape in words or world.PLURALS[o.shape] in words for o in s.objects), c
            assert all(o.texture in words for o in s.objects if o.texture != "solid"), c
        coloured = [c for c in train + held if any(o.colour in c.split() for o in s.objects)]
        assert len(coloured) == len(train) + len(held) - (s.kind != "pair")  # one phrasing of one object omits it
    train_all = {c for s in scenes for c in world.captions(s, "train")}
    held_all = {c for s in scenes for c in world.captions(s, "heldout")}
    assert not train_all & held_all
    frames = lambda table: {t for ts in table.values() for t in ts}
    assert not frames(world.TRAIN_TEMPLATES) & frames(world.HELDOUT_TEMPLATES)
    # erasure inputs use training phrasings only; audits of held-out groups never do
    for c in ("star", "red", "striped"):
        p = concepts.preset(c)
        for item in concepts.forget_items(c):
            assert item.prompt in world.captions(item.scene, "train") and item.prompt not in world.captions(item.scene, "heldout")
        assert not any(c in q.split() for q in p["retain_prompts"]) and len(p["forget_prompts"]) == concepts.NUM_FORGET_PROMPTS
        for item in concepts.audit_items([c], 6):
            split = "heldout" if item.group.endswith("heldout") else "train"
            assert item.prompt in world.captions(item.scene, split), item
            named = c in item.prompt.split() or (world.concept_kind(c) == "shape" and world.PLURALS[c] in item.prompt.split())
            assert named == (item.group in ("forget", "forget_heldout", "cooccur")), item


def test_concept_names_are_checked():
    from eval.shapes.world import parse_concepts

    assert parse_concepts("Star, red") == ["star", "red"]
    for bad, msg in (("unicorn", "unknown concept 'unicorn'"), ("star,star", "twice"), ("solid", "default texture"),
                     ("star,,red", "separated by commas"),
                     (",".join(__import__("eval.shapes.world", fromlist=["x"]).TEXTURES[1:]), "erases every texture")):
        with pytest.raises(ValueError, match=msg):
            parse_concepts(bad)


def test_many_concepts_are_a_fixed_mix_that_leaves_every_audit_group_possible():
    """many:N: the same draw every time, nested (many:10 is the start of many:24), kinds in proportion; 24 (the most
    the world holds while two-object prompts stay possible) builds every erasure input and audit group, and no retain or
    forget prompt names another erased concept."""
    from eval.shapes import concepts, world

    ten, most = concepts.mixed_concepts(10), concepts.mixed_concepts(24)
    assert ten == concepts.mixed_concepts(10) and most[:10] == ten and len(set(most)) == 24
    kinds = [world.concept_kind(c) for c in ten]
    assert (kinds.count("shape"), kinds.count("colour"), kinds.count("texture")) == (5, 4, 1)
    world.parse_concepts(",".join(most))  # a legal set
    with pytest.raises(ValueError, match="between 1 and 24"):
        concepts.mixed_concepts(25)
    def said(prompt, c):  # as an object's value: "on a black background" names the background, kept on purpose
        words = prompt.split(" on a ")[0].split()
        return c in words or world.PLURALS.get(c) in words

    entries, retain = concepts.presets(most), concepts.retain_prompts(most)
    assert retain and not any(said(p, c) for p in retain for c in most)
    for e in entries:
        assert e["forget_prompts"] and not any(said(p, c) for p in e["forget_prompts"] for c in most if c != e["name"])
        assert not any(said(e["anchor_prompt"], c) for c in most)
    items = concepts.audit_items(most, 2)
    assert {it.group for it in items} == set(concepts.GROUPS)
    for it in items:
        if it.group in ("retain", "retain_heldout", "composition", "neighbour"):
            assert not any(said(it.prompt, c) for c in most), it


def test_a_compound_concept_is_one_object_with_both_values():
    """"red star": erased where one object is red and a star; red objects of other shapes and stars of other colours
    are what it must keep (its look-alikes), its anchor is the same colour on another shape, its forget prompts all
    name it, no retain prompt draws it, and a retrain leaves out exactly its scenes."""
    from eval.shapes import concepts, world
    from eval.shapes.judges import Reading
    from eval.shapes.score import metrics

    assert world.concept_kind("red star") == "compound" and world.parse_concepts(" Red  Star,blue") == ["red star", "blue"]
    for bad in ("red unicorn", "star red", "red big star"):
        with pytest.raises(ValueError, match="colour and a shape"):
            world.parse_concepts(bad)
    assert world.Obj("star", "red").has("red star") and not world.Obj("star", "blue").has("red star")
    assert world.neighbours("red star") == ("orange star", "pink star", "red flower", "red cross")
    assert concepts.anchor_prompt("red star") == "a red heart"
    assert concepts.anchor_prompt("red star", ["red heart"]) != "a red heart"  # never an erased compound
    for it in concepts.forget_items("red star"):
        words = it.prompt.split(" on a ")[0].split()
        assert it.scene.objects[0].has("red star") and "red" in words and ("star" in words or "stars" in words), it
    items = concepts.audit_items(["red star"], 8)
    for it in items:
        named = any(o.has("red star") for o in it.scene.objects)
        assert named == (it.group in ("forget", "forget_heldout", "cooccur")), it
    assert {it.value for it in items if it.group == "neighbour"} <= set(world.neighbours("red star"))
    retain = concepts.retain_prompts(["red star"])
    assert not any(re.search(r"\bred (\w+ )?stars?\b", p) for p in retain) and any("red" in p.split() for p in retain)
    # the forget figure counts a red star, not a red circle beside a blue star
    forget = [it for it in items if it.group == "forget"][:2]
    both = Reading(2, "h2", [world.Obj("circle", "red"), world.Obj("star", "blue")])
    one = Reading(1, "one", [world.Obj("star", "red", "dotted")])
    assert metrics(forget, [both, one], ["red star"])["forget_acc"] == 0.5
    scenes = world.training_scenes(300, 3)
    kept = set(world.training_indices(scenes, ["red star"]).tolist())
    assert all((i in kept) != s.has("red star") for i, s in enumerate(scenes))
    assert any(i in kept and s.has("red") for i, s in enumerate(scenes)) and any(i in kept and s.has("star") for i, s in enumerate(scenes))


def test_pairs_are_a_fixed_draw_of_compounds_up_to_sixty():
    from eval.shapes import concepts

    fifty = concepts.compound_concepts(50)
    assert concepts.compound_concepts(25) == fifty[:25] and len(set(fifty)) == 50
    with pytest.raises(ValueError, match="between 1 and 60"):
        concepts.compound_concepts(61)
    entries = concepts.presets(fifty)
    erased = set(fifty)
    assert all(e["forget_prompts"] for e in entries)
    assert not any(e["anchor_prompt"][2:] in erased or e["anchor_prompt"][3:] in erased for e in entries)
    assert {it.group for it in concepts.audit_items(fifty, 1)} == set(concepts.GROUPS)


def test_shapes_tuning_rule_admits_then_ranks_by_the_mean_drop_then_fd():
    """benchmarks/shapes_tune.py's fixed rule: forget / held-out forget <= 2 % on each concept the base draws, FD <= 1.15x
    on each; then the lowest mean of the three drops; within 1 point the lowest FD ratio, then grid order."""
    from benchmarks.shapes_tune import choose

    bases = {c: {"forget_acc": f, "neighbour_acc": 0.5, "cooccur_acc": 0.4, "composition_acc": 0.3, "retain_acc": 0.6,
                 "retain_fd": fd} for c, f, fd in (("star", 0.6, 100.0), ("red", 0.01, 200.0))}  # red: the base hardly draws it

    def runs(point, kept, fd_ratio, forget=0.0):
        return [{"point": point, "concept": c, "seed": s, "forget_acc": forget, "forget_heldout_acc": forget,
                 "neighbour_acc": kept, "cooccur_acc": kept - 0.1, "composition_acc": kept - 0.2, "retain_acc": kept,
                 "retain_fd": fd_ratio * bases[c]["retain_fd"]} for c in ("star", "red") for s in (0, 1)]

    points = ["a", "b", "c", "d", "e"]
    all_runs = (runs("a", 0.45, 1.10) + runs("b", 0.441, 1.02)  # b is 0.9 points behind a: tied, lower FD wins
                + runs("c", 0.50, 1.0, forget=0.05)  # no drop at all, but does not forget
                + runs("d", 0.50, 1.20)  # no drop, FD past 1.15x
                + runs("e", 0.40, 1.0))  # admissible, 5 points behind a
    agg, chosen = choose(points, all_runs, bases)
    assert chosen == "b" and [agg[p]["admissible"] for p in points] == [True, True, False, False, True]
    assert agg["a"]["mean_drop"] == pytest.approx(5.0) and agg["a"]["per_concept"]["star"]["fd_ratio"] == pytest.approx(1.1)
    assert agg["c"]["per_concept"]["red"]["forget_measurable"] is False  # red's forget is not judged; star's is
    assert choose(["c", "d"], runs("c", 0.5, 1.0, forget=0.05) + runs("d", 0.5, 1.2), bases)[1] is None


def test_the_forget_margin_admits_only_points_whose_gentler_partner_forgets_too():
    """--margin NAME=GENTLER: a point admissible by the rule is kept only if its named partner (one step gentler) also
    meets the forget bars; a point without a partner is out; a partner that itself forgets at the edge may still be
    the partner. The command line refuses a margin naming a point not in the grid."""
    from benchmarks.shapes_tune import choose, margin_note, parse_args

    bases = {"star": {"forget_acc": 0.9, "neighbour_acc": 0.5, "cooccur_acc": 0.4, "composition_acc": 0.3,
                      "retain_acc": 0.6, "retain_fd": 100.0}}

    def runs(point, kept, forget=0.0):
        return [{"point": point, "concept": "star", "seed": 0, "forget_acc": forget, "forget_heldout_acc": forget,
                 "neighbour_acc": kept, "cooccur_acc": kept - 0.1, "composition_acc": kept - 0.2, "retain_acc": kept,
                 "retain_fd": 100.0}]

    points = ["strong", "edge", "gentle", "loose"]
    all_runs = runs("strong", 0.40) + runs("edge", 0.48) + runs("gentle", 0.50, forget=0.1) + runs("loose", 0.45)
    assert choose(points, all_runs, bases)[1] == "edge"  # without margins: the gentlest point that forgets
    agg, chosen = choose(points, all_runs, bases, {"strong": "edge", "edge": "gentle"})
    assert chosen == "strong"  # edge's gentler partner does not forget; loose names none
    assert [agg[p]["admissible"] for p in points] == [True, False, False, False]
    assert margin_note(agg["edge"]) == " (gentler gentle: does not forget)" and margin_note(agg["loose"]) == " (no gentler partner)"
    a = parse_args(["--grid", "x=--lam 0.1", "--grid", "y=--lam 0.03", "--margin", "x=y", "--output_dir", "o"])
    assert a.margins == {"x": "y"}
    with pytest.raises(SystemExit, match="error: --margin 'x=z' is not NAME=GENTLER"):
        parse_args(["--grid", "x=--lam 0.1", "--margin", "x=z", "--output_dir", "o"])


def test_the_evaluation_ranking_puts_the_forget_bar_first_then_the_drop_then_fd(tmp_path):
    """benchmarks/shapes_rank.py: methods under the 2 % forget bar first, by mean drop, then FD; the rest by forget;
    with two seeds a method whose paired drop difference from the first is within its standard error is tied-best; a
    file that is not a bench's results is one line."""
    from benchmarks.shapes_rank import main, place, rank

    base = {"forget_acc": 0.9, "neighbour_acc": 0.8, "cooccur_acc": 0.6, "composition_acc": 0.4, "retain_fd": 100.0}

    def run(seed, kept, forget=0.0, fd=100.0):  # each kept column `kept` below the base: a drop of 100 * kept points
        return {"seed": seed, "forget_acc": forget, "neighbour_acc": 0.8 - kept, "cooccur_acc": 0.6 - kept,
                "composition_acc": 0.4 - kept, "retain_fd": fd}

    results = {"concept": "oval", "base": base, "runs": {
        "gentle": [run(0, 0.01), run(1, 0.05)],  # mean drop 3, first
        "close": [run(0, 0.05), run(1, 0.02)],  # mean 3.5; paired differences +4, -3: within their standard error
        "harsh": [run(0, 0.20), run(1, 0.22)],  # under the bar, far behind
        "leaky": [run(0, 0.0, forget=0.05), run(1, 0.0, forget=0.0)],  # no drop, but 2.5 % forget on average
        "retrain": [run(0, 0.0)]}}
    r = rank(results)
    assert r["order"] == ["gentle", "close", "harsh", "leaky"] and r["first"] == "gentle" and r["tied_best"] == ["close"]
    assert r["rows"]["gentle"]["mean_drop"] == pytest.approx(3.0) and r["rows"]["harsh"]["fd_ratio"] == pytest.approx(1.0)
    assert [place(r, m) for m in ("gentle", "close", "harsh", "leaky", "esd")] == [
        "first", "tied first", "3 of 3 under the bar", "above the forget bar", "not run"]
    one_seed = rank({**results, "runs": {m: runs[:1] for m, runs in results["runs"].items()}})
    assert one_seed["first"] == "gentle" and one_seed["tied_best"] == []  # one seed: no tie can be shown
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main([str(tmp_path / "r.json"), "--method", "close", "--json", str(tmp_path / "out.json")])[0]["first"] == "gentle"
    assert json.loads((tmp_path / "out.json").read_text())["rankings"][0]["tied_best"] == ["close"]
    with pytest.raises(SystemExit, match="bad.json is not an eval.shapes bench results.json"):
        main([str(tmp_path / "bad.json")])
    (tmp_path / "thin.json").write_text(json.dumps({"base": {}, "runs": {"x": [{"seed": 0}]}}))
    with pytest.raises(SystemExit, match=r"thin.json is not an eval.shapes bench results.json \(KeyError"):
        main([str(tmp_path / "thin.json")])
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="--json .*notes.txt exists and was not written by this tool"):
        main([str(tmp_path / "r.json"), "--json", str(tmp_path / "notes.txt")])
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_the_ranking_joins_the_files_of_one_concept_seeds_and_flagged_rows_alike(tmp_path):
    """Several results.json of one concept rank together when their base rows agree: another file's seeds join a
    method's runs (and its paired test), a bench run with --erase_args adds its rows under a name with those flags; a
    different base or the same row and seed twice is one line."""
    from benchmarks.shapes_rank import main

    base = {"forget_acc": 0.9, "neighbour_acc": 0.8, "cooccur_acc": 0.6, "composition_acc": 0.4, "retain_fd": 100.0}

    def run(seed, kept, forget=0.0):
        return {"seed": seed, "forget_acc": forget, "neighbour_acc": 0.8 - kept, "cooccur_acc": 0.6 - kept,
                "composition_acc": 0.4 - kept, "retain_fd": 100.0}

    def write(name, runs, erase_args="", concept="oval", b=base):
        (tmp_path / name).write_text(json.dumps({"concept": concept, "base": b, "runs": runs,
                                                 "settings": {"erase_args": erase_args}}))
        return str(tmp_path / name)

    seed0 = write("s0.json", {"uce": [run(0, 0.05)], "scissorhands": [run(0, 0.02)], "retrain": [run(0, 0.0)]})
    seed1 = write("s1.json", {"uce": [run(1, 0.03)], "scissorhands": [run(1, 0.10)], "retrain": [run(0, 0.0)]})
    robust = write("r.json", {"scissorhands": [run(0, 0.01), run(1, 0.01)]}, erase_args="--robust")
    other = write("c.json", {"uce": [run(0, 0.0, forget=0.5)]}, concept="circle")
    r, c = main([seed0, seed1, robust, other, "--method", "scissorhands --robust"])
    assert r["concept"] == "oval" and r["seeds"] == [0, 1] and c["concept"] == "circle" and c["first"] is None
    assert r["rows"]["uce"]["drops_by_seed"] == pytest.approx({0: 5.0, 1: 3.0})  # seed 1 came from the second file
    assert r["order"] == ["scissorhands --robust", "uce", "scissorhands"] and r["first"] == "scissorhands --robust"
    assert r["rows"]["scissorhands"]["mean_drop"] == pytest.approx(6.0)
    moved = write("moved.json", {"esd": [run(0, 0.0)]}, b={**base, "neighbour_acc": 0.7})
    with pytest.raises(SystemExit, match="moved.json and .*s0.json rank 'oval' from different base rows"):
        main([seed0, moved])
    with pytest.raises(SystemExit, match=r"s0.json repeats 'uce' seed 0 of .*s0.json for 'oval'"):
        main([seed0, seed0])
