"""Datasets that ship with kubeloop's dependencies, for the quickstart: ``bundled://<name>``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kubeloop.data.validation import ColumnSpec, DatasetSchema
from kubeloop.errors import DataError


@dataclass(frozen=True)
class BundledDataset:
    name: str
    label: str
    positive_class: str | None  # binary labels only
    slice_column: str
    schema: DatasetSchema

    @property
    def uri(self) -> str:
        return f"bundled://{self.name}"


_YES_NO = ["No", "Yes"]

# Toronto Star arrests for simple marijuana possession, 1997-2002 (Fox, "An R Companion to Applied
# Regression"): was the arrestee released with a summons? `colour` is the fairness slice.
ARRESTS = BundledDataset(
    name="arrests",
    label="released",
    positive_class="Yes",
    slice_column="colour",
    schema=DatasetSchema(
        label="released",
        columns=[
            ColumnSpec(name="released", dtype="string", categories=_YES_NO),
            ColumnSpec(name="colour", dtype="string", categories=["Black", "White"]),
            ColumnSpec(name="year", dtype="int", min=1997, max=2002),
            # Canada's youth justice applies from 12
            ColumnSpec(name="age", dtype="int", min=12, max=100),
            ColumnSpec(name="sex", dtype="string", categories=["Female", "Male"]),
            ColumnSpec(name="employed", dtype="string", categories=_YES_NO),
            ColumnSpec(name="citizen", dtype="string", categories=_YES_NO),
            # number of police databases (of 6) in which the arrestee's name appeared
            ColumnSpec(name="checks", dtype="int", min=0, max=6),
        ],
    ),
)

# Palmer penguins (Gorman, Williams and Fraser, 2014; 344 rows): which of three species? A multiclass label with
# a categorical slice (`island`) and a few nulls (2 rows without measurements, 11 without `sex`).
PENGUINS = BundledDataset(
    name="penguins",
    label="species",
    positive_class=None,
    slice_column="island",
    schema=DatasetSchema(
        label="species",
        columns=[
            ColumnSpec(name="species", dtype="string", categories=["Adelie", "Chinstrap", "Gentoo"]),
            ColumnSpec(name="island", dtype="string", categories=["Biscoe", "Dream", "Torgersen"]),
            ColumnSpec(name="bill_length_mm", dtype="float", max_null_rate=0.01, min=30, max=60),
            ColumnSpec(name="bill_depth_mm", dtype="float", max_null_rate=0.01, min=13, max=22),
            ColumnSpec(name="flipper_length_mm", dtype="float", max_null_rate=0.01, min=170, max=235),
            ColumnSpec(name="body_mass_g", dtype="float", max_null_rate=0.01, min=2700, max=6300),
            ColumnSpec(name="sex", dtype="string", max_null_rate=0.05, categories=["female", "male"]),
        ],
    ),
)

# Abalone (UCI, Nash et al. 1994; 4,177 rows): the number of shell rings (age) from physical measurements. A
# regression label with a categorical slice (`sex`: male, female, infant).
ABALONE = BundledDataset(
    name="abalone",
    label="rings",
    positive_class=None,
    slice_column="sex",
    schema=DatasetSchema(
        label="rings",
        columns=[
            ColumnSpec(name="sex", dtype="string", categories=["F", "I", "M"]),
            *(
                ColumnSpec(name=name, dtype="float", min=0, max=3)
                for name in ("length", "diameter", "height", "whole_weight", "shucked_weight")
            ),
            ColumnSpec(name="viscera_weight", dtype="float", min=0, max=1),
            ColumnSpec(name="shell_weight", dtype="float", min=0, max=1.5),
            ColumnSpec(name="rings", dtype="int", min=1, max=29),
        ],
    ),
)

BUNDLED = {dataset.name: dataset for dataset in (ARRESTS, PENGUINS, ABALONE)}


def get_bundled(name: str) -> BundledDataset:
    try:
        return BUNDLED[name]
    except KeyError:
        raise DataError(f"unknown bundled dataset {name!r}: known are {', '.join(sorted(BUNDLED))}") from None


def bundled_path(name: str) -> Path:
    """The dataset's file inside the scikit-lego wheel, found without importing sklego."""
    dataset = get_bundled(name)
    spec = importlib.util.find_spec("sklego")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"bundled dataset {name!r} ships with scikit-lego: pip install scikit-lego")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{dataset.name}.zip"
    if not path.is_file():
        raise DataError(f"bundled dataset {name!r} not found at {path}: reinstall scikit-lego>=0.9.10")
    return path
