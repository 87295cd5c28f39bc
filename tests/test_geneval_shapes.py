"""GenEval in miniature: the shapes world's GenEval grammar, its renderer, the judge's object
reading, GenEval's rules and flow_grpo's partial credit, metadata files, the reward, the
evaluation hook, ``rewardiff eval geneval-shapes`` and pretraining on the richer world."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.geneval import (TASKS, Detection, GenEvalSpec, Item, check, partial_credit, read_metadata,
                               relative_position, score)
from rewardiff.worlds.shapes import compositions, data as shapes, judge, scenes

FIXTURE = Path(__file__).resolve().parent / "data" / "geneval_shapes_metadata.jsonl"
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _render(spec: GenEvalSpec, seed: int = 0) -> np.ndarray:
    return scenes.render(spec, np.random.default_rng(seed))


def _verdict(spec: GenEvalSpec, image: np.ndarray, relation=relative_position) -> bool:
    """GenEval's verdict of the judge's reading of ``image`` against ``spec``."""
    return check(spec, judge.detections(image), relation)


def _inverted(box_a, box_b) -> set[str]:
    """A deliberately broken rule: every relation read as its opposite (left as right, above as below)."""
    return {OPPOSITE[r] for r in relative_position(box_a, box_b)}


def _swapped(spec: GenEvalSpec) -> GenEvalSpec:
    """The spec with its relation turned around: "a circle left of a square" drawn right of it."""
    item = spec.include[1]
    return dataclasses.replace(spec, include=(spec.include[0], dataclasses.replace(item, position=(OPPOSITE[item.position[0]], 0))))


def fake_detector(images: torch.Tensor) -> list[list[dict]]:
    """A user's detector as ``module:function``: dicts with class, box, colour and score (here
    read by the shapes judge, standing in for a real object detector)."""
    return [[{"class": d.cls, "box": list(d.box), "color": d.color, "score": d.score} for d in judge.detections(im)]
            for im in shapes.to_uint8(images)]


# ----------------------------------------------------------------------------- the judge reads exactly


def test_the_judge_reads_every_object_of_every_task_exactly():
    """Shape, colour and box of every object drawn, on 60 rendered images of each task (360 in
    all; benchmarks/geneval_judge.py measures 2,000 a task); each image meets its prompt."""
    for task in TASKS:
        specs = compositions.all_specs(task)
        rng = np.random.default_rng(7)
        for i in range(60):
            spec = specs[i % len(specs)]
            image, truth = scenes.scene(spec, rng)
            read = sorted((o.shape, o.color, o.box) for o in judge.objects(image))
            assert read == sorted(truth), (task, spec.prompt, i)
            v = judge.geneval_judge(image[None], [spec.prompt])
            assert v["correct"][0] and v["partial"][0] == 1.0, (task, spec.prompt, i)


def test_the_judge_reads_the_shapes_of_the_counting_world():
    x, _, specs = shapes.make_batch(120, seed=3)
    for im, s in zip(shapes.to_uint8(x), specs):
        objs = judge.objects(im)
        assert len(objs) == s.count and {(o.shape, o.color) for o in objs} == {(s.shape, s.color)}


def test_shape_features_on_hand_made_masks():
    square = np.ones((6, 6), bool)
    circle = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], bool)  # fills 12 / 16 of its box
    triangle = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)  # centroid 0.28 h below the box centre
    assert [judge.classify_shape(m) for m in (circle, square, triangle)] == [0, 1, 2]


def test_scenes_are_deterministic_and_positions_hold_with_a_margin():
    a, pa, _ = scenes.make_batch(12, seed=5)
    b, pb, _ = scenes.make_batch(12, seed=5)
    assert torch.equal(a, b) and pa == pb and a.shape == (12, 3, 32, 32)
    assert set(pa) <= set(compositions.train_prompts())
    for prompt, axis, sign in (("a circle left of a square", 0, -1), ("a circle below a square", 1, 1)):
        for seed in range(10):
            circle, square = sorted(judge.objects(_render(compositions.spec_of(prompt), seed)))  # circle (0) first
            assert sign * (circle.centroid[axis] - square.centroid[axis]) > 6, (prompt, seed)  # pixels, y down
            assert prompt.split()[2] in " ".join(relative_position(circle.box, square.box, threshold=scenes.MARGIN_THRESHOLD))


# ----------------------------------------------------------------------------- GenEval's rules


def test_relative_position_by_hand():
    # A's centre (2, 2), B's (12, 2): offset (-10, 0), slack 0.1 * (4 + 4) = 0.8, u = -9.2 / 10 < -0.5
    assert relative_position((0, 0, 4, 4), (10, 0, 14, 4)) == {"left of"}
    assert relative_position((10, 0, 14, 4), (0, 0, 4, 4)) == {"right of"}
    # offset (-5, -5): shrunk (-4.2, -4.2) / 7.07 = -0.59 on both axes: left of and above
    assert relative_position((0, 0, 4, 4), (5, 5, 9, 9)) == {"left of", "above"}
    assert relative_position((0, 10, 4, 14), (0, 0, 4, 4)) == {"below"}
    # offset (-0.5, 0) within the slack 0.8: no relation
    assert relative_position((0, 0, 4, 4), (0.5, 0, 4.5, 4)) == set()


@pytest.mark.parametrize("task", TASKS)
def test_each_task_rule_on_rendered_images(task):
    """A training prompt of each task: its own image is correct, an image breaking one of its requirements is not."""
    spec = compositions.spec_of(compositions.train_prompts(task)[0])
    assert _verdict(spec, _render(spec))
    first = spec.include[0]
    other_color = next(c for c in shapes.COLORS if c != first.color)
    other_shape = next(s for s in shapes.SHAPES if s not in {it.cls for it in spec.include})
    broken = {
        "wrong colour": dataclasses.replace(spec, include=(dataclasses.replace(first, color=other_color), *spec.include[1:])),
        "wrong shape": dataclasses.replace(spec, include=(dataclasses.replace(first, cls=other_shape), *spec.include[1:])),
        "one more": dataclasses.replace(spec, include=(dataclasses.replace(first, count=first.count + 1), *spec.include[1:]), exclude=()),
        "one fewer": dataclasses.replace(spec, include=(dataclasses.replace(first, count=first.count - 1), *spec.include[1:])),
        "missing second object": dataclasses.replace(spec, include=spec.include[:1]),
        "swapped position": _swapped(spec) if task == "position" else None,
    }
    applies = {"wrong colour": first.color is not None, "wrong shape": True, "one more": task == "counting",
               "one fewer": first.count > 1, "missing second object": len(spec.include) == 2, "swapped position": task == "position"}
    for name, bad in broken.items():
        if applies[name]:
            assert not _verdict(spec, _render(bad)), (task, name)


def test_an_inverted_relation_is_caught():
    """The rule tells left from right: the true rule passes the true images and fails the swapped
    ones, and a rule that reads every relation inverted does exactly the opposite."""
    for prompt in compositions.train_prompts("position")[:8]:
        spec = compositions.spec_of(prompt)
        true, swapped = _render(spec, 1), _render(_swapped(spec), 1)
        assert _verdict(spec, true) and not _verdict(spec, swapped), prompt
        assert not _verdict(spec, true, _inverted) and _verdict(spec, swapped, _inverted), prompt


def test_partial_credit_by_hand():
    """flow_grpo's terms: per item its count, then its colour or position."""
    spec = compositions.spec_of("a red square and a blue triangle")
    red_square, red_triangle = Detection("square", (0, 0, 6, 6), "red"), Detection("triangle", (20, 20, 27, 26), "red")
    blue_triangle = Detection("triangle", (10, 20, 17, 26), "blue", score=2.0)
    # square: count 1 of 1 -> 1, red -> 1; triangle: count -> 1, blue: 0 of 1 -> 0: (1 + 1 + 1 + 0) / 4
    assert partial_credit(spec, [red_square, red_triangle]) == 0.75 and not check(spec, [red_square, red_triangle])
    # two triangles: count 1 - |1 - 2| / 1 = 0 and the colour is not read (0): (1 + 1 + 0 + 0) / 4;
    # GenEval reads the most confident triangle only (the blue one): correct
    dets = [red_square, red_triangle, blue_triangle]
    assert partial_credit(spec, dets) == 0.5 and check(spec, dets)
    assert partial_credit(spec, [red_square, blue_triangle]) == 1.0
    # "a circle left of a square" with the circle right of it: square 1, circle 1, position 0
    pos = compositions.spec_of("a circle left of a square")
    assert partial_credit(pos, [Detection("square", (0, 0, 6, 6)), Detection("circle", (20, 0, 26, 6))]) == pytest.approx(2 / 3)
    # four circles where one is asked: 1 - 3 / 1 < 0, clamped at 0
    many = [Detection("circle", (8 * i, 0, 8 * i + 5, 5)) for i in range(4)]
    assert partial_credit(compositions.spec_of("a circle"), many) == 0.0 and check(compositions.spec_of("a circle"), many)


def test_counting_is_exact_through_its_exclude_clause():
    spec = compositions.spec_of("three green squares")
    assert spec.include == (Item("square", 3, "green"),) and spec.exclude[0].count == 4
    four = dataclasses.replace(spec, include=(Item("square", 4, "green"),), exclude=())
    assert not _verdict(spec, _render(four))  # at least three green squares, but a fourth
    assert compositions.spec_of("one red circle").exclude[0].count == 2  # a counting-world prompt reads as counting


# ----------------------------------------------------------------------------- the grammar and its split


def test_the_held_out_split_is_by_composition():
    train, held = set(compositions.train_prompts()), compositions.held_out_prompts()
    assert len(compositions.all_prompts()) == 153 and len(held) == 26 and train.isdisjoint(held)
    trained_atoms = set().union(*(compositions.atoms(compositions.spec_of(p)) for p in train))
    for p in held:
        assert compositions.atoms(compositions.spec_of(p)) <= trained_atoms, p
    for task in TASKS:
        share = len(compositions.held_out_prompts(task)) / len(compositions.all_specs(task))
        assert 0.1 <= share <= 0.2 or task == "single_object", (task, share)  # single_object: 1 of 3
    # color_attr: each held-out pairing is trained with its colours swapped
    assert "a blue circle and a red square" in train and "a red circle and a blue square" in held


def test_the_grammar_tokenizes_and_keeps_the_counting_ids():
    ids = compositions.tokenize(shapes.all_prompts())
    assert torch.equal(ids[:, : shapes.MAX_TOKENS], shapes.tokenize(shapes.all_prompts())) and not ids[:, shapes.MAX_TOKENS:].any()
    assert compositions.GENEVAL_VOCAB[: len(shapes.VOCAB)] == shapes.VOCAB
    assert compositions.tokenize(compositions.all_prompts()).shape == (153, compositions.GENEVAL_MAX_TOKENS)
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        compositions.tokenize(["a purple circle"])
    assert all(compositions.is_prompt(p) for p in compositions.all_prompts()) and not compositions.is_prompt("a red circle left of a blue square")


# ----------------------------------------------------------------------------- metadata files


def test_metadata_files_load_as_prompt_sets_and_specs():
    from rewardiff.prompts import prompt_set

    specs = read_metadata(FIXTURE)
    lines = [json.loads(s) for s in FIXTURE.read_text().splitlines() if s.strip()]
    assert prompt_set(str(FIXTURE)) == [x["prompt"] for x in lines]
    assert {s.tag for s in specs} == set(TASKS) and specs[7].include[0].count == 2  # a count written "2"
    assert specs[4].include[1].position == ("left of", 0)
    assert [s.to_json() for s in specs[:7]] == lines[:7]


def test_the_grammar_writes_and_reads_back_as_geneval_metadata(tmp_path):
    from rewardiff.geneval import write_metadata
    from rewardiff.prompts import prompt_set

    path = write_metadata(tmp_path / "shapes_metadata.jsonl", compositions.all_specs())
    assert read_metadata(path) == compositions.all_specs() and prompt_set(str(path)) == compositions.all_prompts()
    assert json.loads(path.read_text().splitlines()[-50])["tag"] == "color_attr"


@pytest.mark.parametrize(("line", "needle"), [
    ('{"tag": "colors", "include": [{"class": "circle"', "not valid JSON"),
    ('{"tag": "colors", "prompt": "a red circle"}', "'include' must be a non-empty list"),
    ('{"tag": "colors", "include": [{"class": "circle", "count": 0}], "prompt": "x"}', "must be an integer >= 1, got 0"),
    ('{"tag": "position", "include": [{"class": "circle", "position": ["near", 0]}], "prompt": "x"}', "'position' of 'circle'"),
    ('["a red circle"]', "expected a JSON object"),
])
def test_a_bad_metadata_line_is_one_line_naming_file_and_line(tmp_path, line, needle):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_metadata(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"{bad} line 2" in msg and needle in msg, msg


def test_a_user_detector_plugs_in_by_module_and_function():
    from rewardiff.geneval import geneval_reward

    specs = read_metadata(FIXTURE)
    reward = geneval_reward("tests.test_geneval_shapes:fake_detector", FIXTURE)
    true = shapes.to_tensor(np.stack([_render(s, i) for i, s in enumerate(specs)]))
    r = reward(true, [s.prompt for s in specs])
    assert r.tolist() == [1.0] * len(specs)
    correct, _ = score(specs, [judge.detections(im) for im in shapes.to_uint8(true)])
    assert correct.all()
    swapped = shapes.to_tensor(_render(_swapped(specs[4]), 0)[None])
    assert geneval_reward(fake_detector, specs, strict=True)(swapped, [specs[4].prompt]).item() == 0.0
    with pytest.raises(UserError, match="not in the GenEval metadata"):
        reward(true[:1], ["a photo of a dog"])


# ----------------------------------------------------------------------------- the reward and the hook


def test_the_reward_is_black_box_in_zero_one():
    from rewardiff.rewards import get_reward

    reward, strict = get_reward("geneval-shapes"), get_reward("geneval-shapes", strict=True)
    assert not reward.differentiable and reward.value_range == (0.0, 1.0)
    prompts = ["a circle left of a square", "a red square and a blue triangle", "three green squares", "two red circles"]
    x = shapes.to_tensor(np.stack([_render(compositions.spec_of(p)) for p in prompts]))
    assert reward(x, prompts).tolist() == [1.0] * 4 and strict(x, prompts).tolist() == [1.0] * 4
    noise = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_()
    r, s = reward(noise, prompts), strict(noise, prompts)
    assert ((r >= 0) & (r <= 1)).all() and set(s.tolist()) <= {0.0, 1.0} and not r.requires_grad
    assert get_reward("geneval-shapes-strict")(x, prompts).tolist() == [1.0] * 4
    with pytest.raises(UserError, match="not a GenEval shapes prompt"):
        reward(x[:1], ["a dog"])


def test_the_hook_reports_geneval_for_its_prompts_and_the_old_keys_for_counting():
    from rewardiff.worlds.shapes.evaluate import judge_hook

    model = type("M", (), {"texts": None})()
    prompts = ["a circle", "a circle left of a square", "two red circles"]
    x = shapes.to_tensor(np.stack([_render(compositions.spec_of(p)) for p in prompts]))
    ev = judge_hook(model, x, prompts)
    assert ev.metrics == {"judge_geneval_overall": 1.0, "judge_geneval_single_object": 1.0, "judge_geneval_counting": 1.0,
                          "judge_geneval_position": 1.0, "judge_geneval_partial": 1.0} and ev.labels == ["ok"] * 3
    assert set(judge_hook(model, x[2:], prompts[2:]).metrics) == {"judge_count", "judge_color", "judge_both"}
    assert judge_hook(model, x[:1], ["a dog"]) is None


# ----------------------------------------------------------------------------- models, pretraining, the command


def _tiny_geneval_dir(tmp_path: Path) -> Path:
    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig

    torch.manual_seed(0)
    cfg = ShapesModelConfig(block_out_channels=(8, 16, 16), cross_attention_dim=16, attention_head_dim=4, process="flow",
                            prompts="geneval")
    ShapesDenoiser(cfg).save(tmp_path / "tiny-geneval")
    return tmp_path / "tiny-geneval"


def test_eval_needs_a_model_with_the_geneval_words(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from rewardiff.cli import main

    monkeypatch.setattr(sys, "argv", ["rewardiff", "eval", "geneval-shapes", "--model", str(tiny_model_dir), "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert "lacks the GenEval words" in err[0] and "rewardiff pretrain shapes-geneval" in err[0]
    assert not (tmp_path / "e").exists()


def test_eval_writes_every_task_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from rewardiff.cli import app

    out = tmp_path / "e"
    res = CliRunner().invoke(app, ["eval", "geneval-shapes", "--model", str(_tiny_geneval_dir(tmp_path)), "--n", "1",
                                   "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "geneval.json").read_text())
    assert list(summary["tasks"]) == list(TASKS) and summary["images"] == 26 and summary["split"] == "held-out"
    assert summary["overall"] == pytest.approx(np.mean([t["accuracy"] for t in summary["tasks"].values()]))
    assert 0 <= summary["partial"] <= 1 and summary["steps"] == 2 and summary["guidance_scale"] == 2.0
    assert (out / "grid.png").is_file() and "color_attr" in res.output and "overall" in res.output


def test_pretraining_on_the_geneval_grammar(tmp_path):
    from rewardiff.worlds.shapes.denoiser import shapes_model
    from rewardiff.worlds.shapes.pretrain import PretrainConfig, pretrain_shapes

    cfg = PretrainConfig(steps=2, batch_size=4, warmup=1, checkpoint_every=2, block_out_channels=(8, 16, 16), prompts="geneval")
    pretrain_shapes(cfg, tmp_path / "run", progress=False).save(tmp_path / "model")
    m = shapes_model(tmp_path / "model")
    assert m.net.config.prompts == "geneval" and json.loads((tmp_path / "model" / "config.json").read_text())["prompts"] == "geneval"
    m.check_prompts(compositions.all_prompts() + shapes.all_prompts())
    with pytest.raises(UserError, match="pretraining field 'prompts'"):
        pretrain_shapes(dataclasses.replace(cfg, prompts="words"), tmp_path / "bad", progress=False)


def test_an_old_config_without_prompts_loads_as_counting(tiny_model_dir, tmp_path):
    import shutil

    from rewardiff.worlds.shapes.denoiser import shapes_model

    d = tmp_path / "old"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("prompts", None)
    (d / "config.json").write_text(json.dumps(cfg))
    m = shapes_model(d)
    assert m.net.config.prompts == "count"
    with pytest.raises(UserError, match="unknown word 'a'"):
        m.check_prompts(["a circle"])


def test_the_card_measures_geneval_held_out_for_a_geneval_model(tmp_path):
    from rewardiff.worlds.shapes.denoiser import shapes_model
    from rewardiff.worlds.shapes.geneval_suite import card_measure

    res = card_measure(shapes_model(_tiny_geneval_dir(tmp_path)), n_per_prompt=1, steps=1, guidance_scale=1.0, seed=0)
    assert {f"judge_geneval_{t}_held_out" for t in TASKS} | {"judge_geneval_overall_held_out", "judge_geneval_partial_held_out"} == set(res)
