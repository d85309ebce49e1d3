"""When a backup copy of a chunk goes out (orchestrator/evaluation/dispatch.py)."""

from orchestrator.evaluation.dispatch import OVERDUE, typical_rate, worth_copying


def test_a_copy_goes_out_only_when_it_should_answer_first():
    # a known 3x straggler with 10 candidates (3 s), 1 s done: a copy takes 1 s of the 2 left
    assert worth_copying(10, 1.0, 0.3, 0.1, 0.1)
    assert not worth_copying(10, 2.5, 0.3, 0.1, 0.1)  # 0.5 s left, a copy takes 1 s
    # chunks of typical actors near their end: never (the copy would run into the next
    # generation for nothing)
    assert not worth_copying(10, 0.9, 0.1, 0.1, 0.1)
    assert not worth_copying(10, 1.1, 0.1, 0.1, 0.1)
    # overdue: out OVERDUE times a typical actor's time, whatever its owner's last rate said
    assert worth_copying(10, OVERDUE * 1.0, None, None, 0.1)
    assert worth_copying(10, OVERDUE * 1.0 + 0.01, 0.1, 0.1, 0.1)
    assert not worth_copying(10, 0.1, None, None, None)  # nothing measured yet: no copy


def test_typical_rate_is_the_median():
    assert typical_rate({}) is None
    assert typical_rate({"a": 0.1, "b": 0.3, "c": 0.2}) == 0.2
