"""What a TrainingJob's task asks of the network: the loss it trains on, its per-epoch validation metrics, and
how its outputs (logits) become predictions. Training, evaluation and serving all go through here."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from kubeloop.api.modelversion import Task


def loss_function(task: Task) -> nn.Module:
    if task == "binary":
        return nn.BCEWithLogitsLoss()
    if task == "multiclass":
        return nn.CrossEntropyLoss()
    return nn.MSELoss()


def targets(task: Task, labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The encoded label as the loss takes it: class indices (int64) for multiclass, float32 otherwise."""
    return torch.as_tensor(labels, dtype=torch.int64 if task == "multiclass" else torch.float32)


def fitted(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """The network's raw output shaped as the loss expects: one column squeezed away except for multiclass."""
    return logits if task == "multiclass" else logits.squeeze(1)


def predictions(task: Task, logits: torch.Tensor) -> torch.Tensor:
    """P(positive) per row (binary), class probabilities per row (multiclass), the standardized value
    (regression: TabularTransform.decode_value gives it the label's units)."""
    if task == "binary":
        return torch.sigmoid(logits.squeeze(1))
    if task == "multiclass":
        return torch.softmax(logits, dim=1)
    return logits.squeeze(1)


def validation_metrics(task: Task, logits: torch.Tensor, labels: torch.Tensor, label_std: float) -> dict[str, float]:
    """The loss on the held-out rows and the task's headline metric (val_auc, val_accuracy or val_rmse in the
    label's units), as the epoch's progress line and the model card's curves show them."""
    out = fitted(task, logits)
    metrics = {"val_loss": loss_function(task)(out, labels).item()}
    if task == "binary":
        from sklearn.metrics import roc_auc_score

        y = labels.cpu().numpy()
        metrics["val_auc"] = float(roc_auc_score(y, out.cpu().numpy())) if 0 < y.mean() < 1 else float("nan")
    elif task == "multiclass":
        metrics["val_accuracy"] = float((out.argmax(dim=1) == labels).float().mean())
    else:
        metrics["val_rmse"] = math.sqrt(metrics["val_loss"]) * label_std
    return metrics
