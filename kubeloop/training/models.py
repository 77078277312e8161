"""Model builders: `module:function` names that a TrainingJob's spec.model.builder points at."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from torch import nn

from kubeloop.errors import SpecError


def mlp(input_dim: int, hidden_units: Sequence[int] = (32, 16), dropout: float = 0.0) -> nn.Module:
    """A binary classifier returning one logit per row."""
    layers: list[nn.Module] = []
    width = input_dim
    for units in hidden_units:
        layers += [nn.Linear(width, int(units)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(units)
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def resolve_builder(reference: str) -> Callable[..., nn.Module]:
    module_name, _, attribute = reference.partition(":")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise SpecError(f"spec.model.builder: cannot import {reference!r}: {error}") from None
    if not callable(builder):
        raise SpecError(f"spec.model.builder: {reference!r} is not callable")
    return builder


def build_model(reference: str, input_dim: int, params: dict) -> nn.Module:
    builder = resolve_builder(reference)
    try:
        return builder(input_dim, **params)
    except TypeError as error:
        raise SpecError(f"spec.model.params: {reference} rejected {sorted(params)}: {error}") from None
