"""The report tests' HTML check: every element closed in order; ids and images (src, alt) collected."""

from __future__ import annotations

from html.parser import HTMLParser


class Structure(HTMLParser):
    VOID = frozenset({"meta", "img", "br", "hr", "link", "input"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.images: list[tuple[str, str]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if values.get("id"):
            self.ids.append(values["id"] or "")
        if tag == "img":
            self.images.append((values.get("src") or "", values.get("alt") or ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def structure_of(text: str) -> Structure:
    structure = Structure()
    structure.feed(text)
    structure.close()
    assert not structure.errors and not structure.stack, (structure.errors, structure.stack)
    return structure
