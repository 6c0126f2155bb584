"""The conversion report: one line per replaced, fused, folded or skipped module, with the reason."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Sequence

__all__ = ["REPORT_ATTRIBUTE", "ConversionReport", "ReportEntry"]

# The attribute the report stays on, on the converted model.
REPORT_ATTRIBUTE = "fused_resnet_report"


@dataclass(frozen=True)
class ReportEntry:
    """One line of the report: a module (qualified name), what happened to it, and why."""

    name: str
    action: str  # "replaced", "fused", "folded" or "skipped"
    detail: str

    @property
    def display_name(self) -> str:
        return self.name or "(model)"


class ConversionReport:
    """What :func:`convert` (and :func:`fused_resnet.fold_bn`) did to each module.

    A sequence of :class:`ReportEntry`; ``str(report)`` is a readable table.
    """

    ACTIONS = ("replaced", "fused", "folded", "skipped")

    def __init__(self, entries: Sequence[ReportEntry] = ()):
        self.entries: List[ReportEntry] = list(entries)

    def add(self, name: str, action: str, detail: str) -> None:
        if action not in self.ACTIONS:
            raise ValueError(f"action must be one of {', '.join(self.ACTIONS)}, got '{action}'")
        self.entries.append(ReportEntry(name, action, detail))

    def __iter__(self) -> Iterator[ReportEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):
        return self.entries[index]

    def of(self, action: str) -> List[ReportEntry]:
        """The entries with this action."""
        return [entry for entry in self.entries if entry.action == action]

    @property
    def replaced(self) -> List[ReportEntry]:
        return self.of("replaced")

    @property
    def fused(self) -> List[ReportEntry]:
        return self.of("fused")

    @property
    def folded(self) -> List[ReportEntry]:
        return self.of("folded")

    @property
    def skipped(self) -> List[ReportEntry]:
        return self.of("skipped")

    def entry(self, name: str) -> ReportEntry:
        """The last entry about module ``name`` (KeyError if none)."""
        for entry in reversed(self.entries):
            if entry.name == name:
                return entry
        raise KeyError(f"no report entry for module '{name}'")

    def summary(self) -> str:
        counts = [f"{len(self.of(action))} {action}" for action in self.ACTIONS if self.of(action)]
        return "fused-resnet: " + (", ".join(counts) if counts else "nothing to convert")

    def __str__(self) -> str:
        rows = [("module", "action", "detail")] + [(e.display_name, e.action, e.detail) for e in self.entries]
        widths = [max(len(row[i]) for row in rows) for i in range(2)]
        lines = [self.summary()]
        for index, (name, action, detail) in enumerate(rows):
            lines.append(f"  {name:<{widths[0]}}  {action:<{widths[1]}}  {detail}".rstrip())
            if index == 0:
                lines.append(f"  {'-' * widths[0]}  {'-' * widths[1]}  {'-' * 6}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ConversionReport({self.summary()!r}, {len(self.entries)} entries)"
