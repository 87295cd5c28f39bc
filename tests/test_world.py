"""The shapes world and its judge, against the generator's ground truth and hand-made images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewardiff.worlds.shapes import data as shapes, judge


def test_world_is_deterministic():
    a, pa, _ = shapes.make_batch(16, seed=5)
    b, pb, _ = shapes.make_batch(16, seed=5)
    assert torch.equal(a, b) and pa == pb
    assert a.shape == (16, 3, 32, 32) and a.min() >= -1 and a.max() <= 1


def test_judge_reads_ground_truth_exactly():
    prompts = [s.prompt for s in shapes.all_specs()]
    x, p, specs = shapes.make_batch(480, seed=1, prompts=prompts)
    verdict = judge.judge(x, p)
    assert verdict["both"].all()
    readings = [judge.read(im) for im in shapes.to_uint8(x)]
    assert [r.count for r in readings] == [s.count for s in specs]


def _square(img: np.ndarray, y: int, x: int, size: int, rgb) -> None:
    img[y : y + size, x : x + size] = rgb


def test_judge_on_hand_made_images():
    red, blue = shapes.COLOR_RGB[0], shapes.COLOR_RGB[2]
    img = np.zeros((32, 32, 3), np.uint8)
    _square(img, 2, 2, 5, red)
    _square(img, 20, 20, 5, red)
    assert judge.read(img).per_color == (2, 0, 0, 0)
    _square(img, 7, 7, 4, red)  # touches the first square at a corner: 8-connectivity merges them
    assert judge.read(img).per_color == (2, 0, 0, 0)
    _square(img, 2, 25, 2, blue)  # 4 px: a speck, not an object
    assert judge.read(img).count == 2
    _square(img, 12, 25, 3, blue)  # 9 px: an object of another color
    assert judge.read(img).per_color == (2, 0, 1, 0)
    v = judge.judge(img[None], ["three red squares"])
    assert v["count"][0] and not v["color"][0]
    dim = np.full((32, 32, 3), 90, np.uint8)  # a gray background below the threshold is not an object
    assert judge.read(dim).count == 0


def test_prompts_parse_and_tokenize():
    for s in shapes.all_specs():
        assert shapes.parse_prompt(s.prompt) == s
    assert len(shapes.train_prompts()) == 42 and set(shapes.held_out_prompts()).isdisjoint(shapes.train_prompts())
    ids = shapes.tokenize(["two red circles", ""])
    assert ids.shape == (2, shapes.MAX_TOKENS) and ids[1, 0] == shapes.VOCAB.index("<null>")
    with pytest.raises(ValueError, match="unknown word 'five'"):
        shapes.tokenize(["five red circles"])
    with pytest.raises(ValueError, match="not a shapes-world prompt"):
        shapes.parse_prompt("red circles")
