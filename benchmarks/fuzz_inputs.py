"""The long form of the bad-input fuzz test: thousands of generated mistakes on the command line.

    python benchmarks/fuzz_inputs.py --examples 1000 --out benchmarks/results/fuzz

Every example is a mistake by construction (``tests/fuzz_inputs.py``); each must give one line
on stderr, exit status 2, no traceback, and write nothing. Writes ``tally.json`` (examples by
kind, failures with their command lines) and ``tally.md``; exits 1 when any example failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from hypothesis import HealthCheck, given, settings

    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json
    from tests.fuzz_inputs import bad_finetune, bad_sample, check

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="examples per command")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz")
    a = ap.parse_args()
    tally: dict = {"command": f"python benchmarks/fuzz_inputs.py --examples {a.examples}", **stamp(), "commands": {}}
    t0 = time.perf_counter()
    for name, strategy, prefix in (("finetune", bad_finetune(), ["finetune"]), ("sample", bad_sample(), [])):
        seen: Counter = Counter()
        failures: list[dict] = []

        @settings(max_examples=a.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(case):
            args, files = case
            seen[args[0] if not args[0].startswith("-") else args[0]] += 1
            problem = check(prefix + args, files)
            if problem is not None:
                failures.append({"args": prefix + args, "files": {k: (v.decode("utf-8", "replace")[:80] if v is not None else "<dir>")
                                                                   for k, v in files.items()}, "problem": problem})

        run()
        tally["commands"][name] = {"examples": sum(seen.values()), "failures": failures[:50], "failed": len(failures)}
        print(f"{name}: {sum(seen.values())} examples, {len(failures)} failed", flush=True)
    tally["seconds"] = time.perf_counter() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "tally.json", tally)
    rows = [f"| {k} | {v['examples']} | {v['failed']} |" for k, v in tally["commands"].items()]
    (a.out / "tally.md").write_text("| command | generated mistakes | not one line with status 2, or wrote files |\n|---|---|---|\n"
                                    + "\n".join(rows) + f"\n\n{tally['date']}, {_machine(tally['machine'])}, commit {tally['commit'][:7]}\n")
    return 1 if any(v["failed"] for v in tally["commands"].values()) else 0


def _machine(m: dict) -> str:
    return f"{m['cpus']}-core {m['processor']} CPU{', ' + m['gpu'] if m.get('gpu') else ''}, torch {m['torch']}"


if __name__ == "__main__":
    sys.exit(main())
