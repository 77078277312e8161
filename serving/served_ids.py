"""Which version served each request, by the event id the splitter gives it (`ce-id`), so that feedback naming the
id later reaches the drift sidecar of that version (and of the shadow that got a copy): a bounded map, the oldest
ids dropped first, and the split of a feedback body (kubeloop/feedback.py) into one part per version."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

_ENTRY_FIELD = re.compile(r"feedback\[(\d+)\]")


@dataclass(frozen=True)
class Served:
    version: str
    mirrored: str | None = None  # the shadow version that got a copy of the request


class ServedIds:
    """The newest `capacity` event ids and who served them; an id seen again counts as new."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"ids to remember: expected at least 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, Served] = OrderedDict()
        self._kinds: dict[tuple[str, str | None], Served] = {}  # one Served per (version, mirrored): small entries

    def remember(self, event_id: str, version: str, mirrored: str | None = None) -> None:
        served = self._kinds.get((version, mirrored))
        if served is None:
            served = self._kinds[(version, mirrored)] = Served(version, mirrored)
        self._ids[event_id] = served
        self._ids.move_to_end(event_id)
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def get(self, event_id: str) -> Served | None:
        return self._ids.get(event_id)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class FeedbackPart:
    """The entries of a feedback body for one version, with their positions in the body the client sent."""

    entries: list[Any] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)

    def add(self, entry: Any, position: int) -> None:
        self.entries.append(entry)
        self.positions.append(position)

    def body(self) -> bytes:
        return orjson.dumps({"feedback": self.entries})

    def in_client_terms(self, message: str) -> str:
        """An upstream's error about `feedback[i]` of this part, naming the entry's index in the client's body."""
        return _ENTRY_FIELD.sub(lambda m: f"feedback[{self._position(int(m.group(1)))}]", message)

    def _position(self, index: int) -> int | str:
        return self.positions[index] if index < len(self.positions) else index


def split_feedback(
    body: bytes, served: ServedIds, stable: str
) -> tuple[dict[str, FeedbackPart], dict[str, FeedbackPart]] | None:
    """(parts by the version that served each id, parts for the shadow versions that got a copy); ids never seen (or
    forgotten) go to the stable version, whose sidecar counts them unknown. None when the body is not a list of
    entries with ids: the stable's server then answers it (its 400 names the field)."""
    try:
        entries = orjson.loads(body).get("feedback")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(entries, list) or not entries:
        return None
    by_version: dict[str, FeedbackPart] = {}
    by_shadow: dict[str, FeedbackPart] = {}
    for position, entry in enumerate(entries):
        event_id = entry.get("id") if isinstance(entry, dict) else None
        if type(event_id) is not str or not event_id:
            return None
        seen = served.get(event_id)
        by_version.setdefault(seen.version if seen else stable, FeedbackPart()).add(entry, position)
        if seen is not None and seen.mirrored is not None and seen.mirrored != seen.version:
            by_shadow.setdefault(seen.mirrored, FeedbackPart()).add(entry, position)
    return by_version, by_shadow
