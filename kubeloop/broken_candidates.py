"""Candidates that should not reach users, made from a real version for rollback drills (`kubeloop quickstart
--loop --break`, the shadow tests): each a copy of the version's artifact with its weights rewritten and a
ModelVersion record pointing at it; the registry's copy is left intact."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

from kubeloop.api.modelversion import ModelVersion
from kubeloop.errors import KubeloopError


def garbage_record(record: ModelVersion, directory: Path, seed: int = 0) -> Path:
    """The `garbage` broken candidate: the version's weights scrambled and its output layer zeroed with a bias of -8
    (every prediction ~0.0003, whatever the input)."""
    import torch

    generator = torch.Generator().manual_seed(seed)

    def scramble(state: dict, weight: str, bias: str) -> None:
        for key, value in state.items():
            if value.is_floating_point():
                state[key] = torch.randn(value.shape, generator=generator) * 4
        state[weight], state[bias] = torch.zeros_like(state[weight]), torch.full_like(state[bias], -8.0)

    return _rewritten_record(record, directory, scramble)


def worse_record(record: ModelVersion, directory: Path, rows: pd.DataFrame) -> Path:
    """The `worse` candidate, worse on labels but not broken: the version's output logit mirrored around its median
    on `rows` (the last layer's w' = -w, b' = 2m - b), so it answers as fast, without errors, with predictions
    spread much as before, but ranked backwards (ROC AUC -> 1 - AUC). Binary models only."""
    import torch

    from kubeloop.artifact import ModelArtifact

    if record.spec.signature.task != "binary":
        raise KubeloopError(f"{record.metadata.name}: the worse candidate mirrors a binary model's logit")
    artifact = ModelArtifact.load(record.spec.artifact_uri)
    transform = artifact.transform
    features = torch.from_numpy(transform.transform_columns(transform.frame_columns(rows)))
    with torch.inference_mode():
        median = float(artifact.model(features).median())

    def mirror(state: dict, weight: str, bias: str) -> None:
        state[weight], state[bias] = -state[weight], 2 * median - state[bias]

    return _rewritten_record(record, directory, mirror)


def _rewritten_record(record: ModelVersion, directory: Path, rewrite: Callable[[dict, str, str], None]) -> Path:
    """A copy of the version's artifact with its weights rewritten in place (`rewrite(state, output weight, output
    bias)`, the names of the last layer's parameters), and a ModelVersion record pointing at it; the registry's copy
    is left intact."""
    import torch

    from kubeloop.artifact import WEIGHTS, local_path

    artifact = directory / "artifact"
    shutil.copytree(local_path(record.spec.artifact_uri), artifact)
    state = torch.load(artifact / WEIGHTS, weights_only=True)
    weight, bias = [k for k in state if k.endswith(".weight")][-1], [k for k in state if k.endswith(".bias")][-1]
    rewrite(state, weight, bias)
    torch.save(state, artifact / WEIGHTS)
    changed = record.model_copy(deep=True)
    changed.spec.artifact_uri = str(artifact)
    path = directory / "modelversion.yaml"
    path.write_text(yaml.safe_dump(changed.to_manifest(), sort_keys=False))
    return path
