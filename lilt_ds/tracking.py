"""Watching a held-out metric across a run's evaluations: the best value so far and how many evaluations
ago it came, for ``checkpoint.keep_best`` and ``train.early_stopping``. Checked against the run's
evaluation settings when the config loads; saved in every checkpoint, so a resumed run decides alike."""

from __future__ import annotations

import math

from .data.loader import has_retrieval_eval
from .errors import ConfigError

RETRIEVAL_METRICS = tuple(
    [f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)] + ["txt_r_mean", "img_r_mean", "r_mean"]
)
"""Retrieval on the held-out split (data.eval_file, or the demo's): results.jsonl's names."""
CLASSIFICATION_METRICS = ("zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall")
"""Zero-shot classification during training (eval.classification)."""


class MetricWatch:
    """The best value of one metric (higher is better) and the evaluations since it improved by more
    than ``min_delta``."""

    def __init__(self, metric: str, min_delta: float = 0.0):
        self.metric, self.min_delta = metric, min_delta
        self.best, self.best_step, self.stale = -math.inf, None, 0

    def update(self, metrics: dict, step: int) -> bool | None:
        """Record an evaluation: True if the metric improved, False if not, None if it was not measured."""
        if self.metric not in metrics:
            return None
        value = metrics[self.metric]
        if value > self.best + self.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") == self.metric:  # another metric watched now: start afresh
            self.best, self.best_step, self.stale = state["best"], state["best_step"], state["stale"]


def check_watched_metrics(cfg) -> None:
    """``checkpoint.keep_best`` and ``train.early_stopping.metric`` name a metric the run measures."""
    data, evaluation = cfg.data, cfg.eval
    retrieval_data = has_retrieval_eval(data)
    by_steps = evaluation.every_steps is not None
    measured = {
        **dict.fromkeys(RETRIEVAL_METRICS, retrieval_data and (evaluation.every_epochs > 0 or by_steps)),
        **dict.fromkeys(
            CLASSIFICATION_METRICS,
            evaluation.classification.data is not None and (evaluation.classification.every_epochs > 0 or by_steps),
        ),
    }
    for key, metric in (
        ("checkpoint.keep_best", cfg.checkpoint.keep_best),
        ("train.early_stopping.metric", cfg.train.early_stopping.metric),
    ):
        if metric is None:
            continue
        if metric not in measured:
            raise ConfigError(
                f"{key} = {metric!r} is not an evaluation metric: use one of {', '.join(RETRIEVAL_METRICS)} "
                f"(retrieval on the held-out split) or {', '.join(CLASSIFICATION_METRICS)} (eval.classification)"
            )
        if not measured[metric]:
            needs = (
                "held-out retrieval data (data.eval_file) and evaluations (eval.every_epochs > 0 or eval.every_steps)"
                if metric in RETRIEVAL_METRICS
                else "eval.classification.data and its evaluations (eval.classification.every_epochs > 0)"
            )
            raise ConfigError(f"{key} = {metric!r}, but this run never measures it: it needs {needs}")
