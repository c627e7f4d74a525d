"""Accuracy, shipped with ijepa-hf so that `evaluate.load` works offline (no download from the Hugging Face Hub)."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
accuracy = (number of predictions equal to their reference) / (number of predictions).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices.
    references (`list` of `int`): ground-truth class indices, as many as `predictions`.
    normalize (`bool`, defaults to `True`): return the fraction correct; `False` returns the number correct.
    sample_weight (`list` of `float`, *optional*): one weight per prediction; the weighted fraction (or weighted count)
        of correct predictions is returned.

Returns:
    accuracy (`float`): in [0, 1] when `normalize`, else the (weighted) number of correct predictions.

Example:
    >>> accuracy = evaluate.load("modeling_ijepa/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction (or count) of predictions equal to their reference, optionally weighted per sample."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.shape != references.shape:
            raise ValueError(
                f"Accuracy needs one reference per prediction; got {predictions.shape[0]} predictions and "
                f"{references.shape[0]} references."
            )
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"sample_weight needs one weight per prediction, got shape {weights.shape}.")
        total = float((correct * weights).sum())
        if normalize:
            total = total / float(weights.sum()) if weights.sum() > 0 else 0.0
        return {"accuracy": total}
