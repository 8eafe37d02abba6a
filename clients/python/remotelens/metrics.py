"""Metrics the server back-propagates itself, for run_with_cache(..., incl_bwd=True, metric=...).

TransformerLens back-propagates whatever scalar the notebook computes from the logits; over the
wire that costs the logits' round trip. A declared metric is computed on the server instead, so a
gradient call ships only the activations and gradients it asked for:

    from remotelens import metrics
    _, cache = model.run_with_cache(corrupt, incl_bwd=True, names_filter=names,
                                    metric=metrics.logit_diff(correct=[" Mary"], incorrect=[" John"]))

The loss (return_type="loss") needs no metric object: incl_bwd=True back-propagates it.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from .v1 import remotelens_pb2 as pb

__all__ = ["LogitDiff", "logit_diff"]


@dataclass(frozen=True)
class LogitDiff:
    """Mean over rows of logits[row, position, correct[row]] - logits[row, position, incorrect[row]]."""

    correct: List[int]
    incorrect: List[int]
    position: int = -1

    def to_proto(self) -> pb.LogitDiffMetric:
        return pb.LogitDiffMetric(correct=self.correct, incorrect=self.incorrect,
                                  position=self.position)


def _ids(tokens: Union[int, Sequence[int]], what: str) -> List[int]:
    ids = [int(tokens)] if isinstance(tokens, int) else [int(t) for t in tokens]
    if not ids:
        raise ValueError(f"{what} needs one token id, or one per row")
    return ids


def logit_diff(correct: Union[int, Sequence[int]], incorrect: Union[int, Sequence[int]],
               position: Optional[int] = -1) -> LogitDiff:
    """The logit difference attribution patching uses.

    Args:
        correct, incorrect: token ids, one for every row or one per row.
        position: the position read in every row (negative counts from the end; default the last).
    """
    return LogitDiff(_ids(correct, "correct"), _ids(incorrect, "incorrect"),
                     -1 if position is None else int(position))
