"""The model artifact: network weights plus the fitted transform, loaded the same way by evaluation and serving."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
from torch import nn

from kubeloop import storage
from kubeloop.errors import KubeloopError
from kubeloop.training import tasks
from kubeloop.training.models import build_model
from kubeloop.transform import TabularTransform

WEIGHTS, MODEL_CONFIG, TRANSFORM = "model.pt", "model.json", "transform.json"


def local_path(uri: str) -> Path:
    """The artifact's directory on this machine: a local path or file:// URI as it is, an s3:// one fetched once
    into the cache (kubeloop.storage)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    if parsed.scheme == "s3":
        return storage.fetch_artifact(uri)
    raise KubeloopError(f"artifact URI {uri!r}: kubeloop reads local paths, file:// and s3:// URIs")


class ModelArtifact:
    def __init__(self, model: nn.Module, transform: TabularTransform, builder: str, params: dict[str, Any]):
        self.model, self.transform, self.builder, self.params = model.eval(), transform, builder, params

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """The model's answer per row: P(positive) (binary, shape n), class probabilities in the order of
        transform.classes (multiclass, n by classes), the value in the label's units (regression, n); float32."""
        return self.predict_columns(self.transform.frame_columns(frame))

    def predict_columns(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """`predict` of one array per feature, as `TabularTransform.transform_columns` takes them."""
        features = torch.from_numpy(self.transform.transform_columns(columns))
        task = self.transform.task
        with torch.inference_mode():
            out = tasks.predictions(task, self.model(features)).numpy()
        return self.transform.decode_value(out).astype(np.float32) if task == "regression" else out

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / WEIGHTS)
        config = {
            "builder": self.builder,
            "params": self.params,
            "input_dim": self.transform.output_dim,
            "outputs": self.transform.label_width,
        }
        (directory / MODEL_CONFIG).write_text(json.dumps(config, indent=2))
        self.transform.save(directory / TRANSFORM)

    @classmethod
    def load(cls, uri: str) -> ModelArtifact:
        directory = local_path(uri)
        if not (directory / MODEL_CONFIG).is_file():
            raise KubeloopError(f"{uri} is not a kubeloop model artifact: {MODEL_CONFIG} is missing")
        config = json.loads((directory / MODEL_CONFIG).read_text())
        model = build_model(config["builder"], config["input_dim"], config["params"], config.get("outputs", 1))
        model.load_state_dict(torch.load(directory / WEIGHTS, weights_only=True))
        return cls(model, TabularTransform.load(directory / TRANSFORM), config["builder"], config["params"])
