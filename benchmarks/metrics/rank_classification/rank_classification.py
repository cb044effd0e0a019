"""Rank classification accuracy, as a local `evaluate` module: `evaluate.load("benchmarks/metrics/rank_classification")`.

Each answer choice is scored by the length-normalised sum of its tokens' cross-entropies given the prompt (the
prompt is encoded once per choice); the choice with the lowest score is the prediction (T0, GLIDER).
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy of picking, per example, the answer choice with the lowest length-normalised cross-entropy."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): per example, the length-normalised cross-entropy of every answer choice.
    references (list of int): per example, the index of the correct choice.
Returns:
    accuracy (float): share of examples whose lowest-scored choice is the correct one, in [0, 1]. Ties go to the
        first of the tied choices.
"""


class RankClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        hits = [min(range(len(scores)), key=scores.__getitem__) == ref for scores, ref in zip(predictions, references)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0}
