"""Model builders: `module:function` names that a TrainingJob's spec.model.builder points at."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from torch import nn

from kubeloop.errors import SpecError


def mlp(input_dim: int, hidden_units: Sequence[int] = (32, 16), dropout: float = 0.0, outputs: int = 1) -> nn.Module:
    """A multilayer perceptron returning `outputs` values per row: one logit (binary), one per class (multiclass)
    or the value (regression)."""
    layers: list[nn.Module] = []
    width = input_dim
    for units in hidden_units:
        layers += [nn.Linear(width, int(units)), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(units)
    layers.append(nn.Linear(width, outputs))
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


def build_model(reference: str, input_dim: int, params: dict, outputs: int = 1) -> nn.Module:
    """The builder's network; a builder is asked for `outputs` (keyword) only when more than one is needed, so a
    single-output builder need not take it."""
    builder = resolve_builder(reference)
    extra = {"outputs": outputs} if outputs != 1 else {}
    try:
        return builder(input_dim, **params, **extra)
    except TypeError as error:
        asked = sorted(params) + (["outputs"] if extra else [])
        hint = f" (multiclass asks the builder for outputs={outputs}: give it that keyword)" if extra else ""
        raise SpecError(f"spec.model.params: {reference} rejected {asked}: {error}{hint}") from None
