"""Batch inference: a BatchPrediction scored on Ray Data with a registered model version."""

from kubeloop.batch.run import BatchOutcome, run_batch_prediction

__all__ = ["BatchOutcome", "run_batch_prediction"]
