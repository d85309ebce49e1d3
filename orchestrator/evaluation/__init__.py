"""Evaluators: what scores candidate populations for the schedule (in-process here, Ray later)."""

from .interface import CandidateId, Evaluation, Evaluator, check_evaluation

__all__ = ["CandidateId", "Evaluation", "Evaluator", "check_evaluation"]
