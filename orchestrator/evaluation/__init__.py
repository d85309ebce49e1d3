"""Evaluators: what scores candidate populations for the schedule (docs/design.md §6).

`interface.py` the contract; `local.py` one `EvalWorker` in this process (and the driver side's
one entry point into `workers/`); `ray_eval.py` the Ray evaluator, composed of `pool.py` (the
actors) and `dispatch.py` (a population's chunks). Only the interface is imported here: neither
torch nor Ray is loaded until an evaluator is built.
"""

from .interface import Diagnostics, EvalResult, Evaluator, EvaluatorInfo

__all__ = ["Diagnostics", "EvalResult", "Evaluator", "EvaluatorInfo"]
