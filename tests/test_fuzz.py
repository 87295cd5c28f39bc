"""Bad input of every kind, generated (hypothesis): one line on stderr, exit status 2, no
traceback, nothing written. The strategies are in ``tests/fuzz_inputs.py``; the long form, with
thousands of examples and its tally kept, is ``benchmarks/fuzz_inputs.py``."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.fuzz_inputs import bad_finetune, bad_sample, check

FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(bad_finetune())
def test_bad_finetune_input_is_one_line_and_writes_nothing(case):
    args, files = case
    assert check(["finetune", *args], files) is None


@FAST
@given(bad_sample())
def test_bad_sample_input_is_one_line_and_writes_nothing(case):
    args, files = case
    assert check(args, files) is None


def test_the_property_can_fail():
    """A good command is not taken for a mistake: the check reports its exit status 0."""
    problem = check(["rewards"], {})
    assert problem is not None and problem.startswith("exit status 0")
