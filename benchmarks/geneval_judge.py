"""How exactly the shapes judge reads GenEval scenes: rendered images of every task, read back.

    python benchmarks/geneval_judge.py --per-task 2000 --out benchmarks/results/geneval_judge

For each of GenEval's six tasks, ``--per-task`` images are rendered (cycling through every
prompt of the task, held-out ones included; seed fixed) and read by the judge. An image is
read exactly when the objects the judge finds, as (shape, colour, box), are those drawn; it
also counts whether GenEval's rules call it correct and flow_grpo's partial credit is 1.
Counting-world images (``data.make_batch``) are read too: count, shape and colour of each
object. Writes ``exactness.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _task(task: str, n: int, seed: int) -> dict:
    import numpy as np

    from rewardiff.worlds.shapes import compositions, judge, scenes

    specs, rng = compositions.all_specs(task), np.random.default_rng(seed)
    misread = wrong = 0
    for i in range(n):
        spec = specs[i % len(specs)]
        image, truth = scenes.scene(spec, rng)
        misread += sorted((o.shape, o.color, o.box) for o in judge.objects(image)) != sorted(truth)
        v = judge.geneval_judge(image[None], [spec.prompt])
        wrong += not (v["correct"][0] and v["partial"][0] == 1.0)
    return {"images": n, "misread": int(misread), "not_correct": int(wrong)}


def _counting_world(n: int, seed: int) -> dict:
    from rewardiff.worlds.shapes import data as shapes, judge

    x, _, specs = shapes.make_batch(n, seed=seed, prompts=shapes.all_prompts())
    bad = 0
    for im, s in zip(shapes.to_uint8(x), specs):
        objs = judge.objects(im)
        bad += len(objs) != s.count or any((o.shape, o.color) != (s.shape, s.color) for o in objs)
    return {"images": n, "misread": int(bad)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-task", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "geneval_judge")
    a = ap.parse_args()
    from rewardiff.geneval import TASKS
    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json

    rows = {t: _task(t, a.per_task, a.seed) for t in TASKS}
    rows["counting world"] = _counting_world(a.per_task, a.seed)
    for name, r in rows.items():
        print(f"{name:16s} {r['images']:6d} images, {r['misread']} misread, {r.get('not_correct', 0)} not correct")
    write_json(a.out / "exactness.json", {"per_task": a.per_task, "seed": a.seed, "rows": rows, **stamp()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
