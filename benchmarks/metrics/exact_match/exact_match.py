"""Exact match of generated answers, as a local `evaluate` module: `evaluate.load("benchmarks/metrics/exact_match")`."""

import datasets
import evaluate

_DESCRIPTION = "The share of predictions equal to their reference after stripping surrounding whitespace."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated answers.
    references (list of str): gold answers.
Returns:
    exact_match (float): share of exact matches, in [0, 1].
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        matches = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return {"exact_match": sum(matches) / len(matches) if matches else 0.0}
