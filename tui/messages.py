"""Messages that carry data from worker threads to the UI."""

from __future__ import annotations

from textual.message import Message

from tokentop.tui.snapshot import Snapshot


class SnapshotReady(Message):
    """A refresh worker finished its queries; the panes apply ``snapshot``.

    Posted from a worker thread (``post_message`` is thread-safe). A newer snapshot replaces an
    older one still waiting in the queue, so a slow UI never works through a backlog.
    """

    def __init__(self, snapshot: Snapshot, for_export: dict[str, str] | None = None) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.for_export = for_export
        """For an export: the report texts by format, to write beside the SVG of this snapshot."""

    def can_replace(self, message: Message) -> bool:
        """Merge floods: only the newest snapshot matters (an export's is never dropped)."""
        return (
            isinstance(message, SnapshotReady)
            and message.for_export is None
            and self.for_export is None
        )


class SnapshotExported(Message):
    """An export finished writing ``paths`` (JSON and SVG)."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        super().__init__()
        self.paths = paths
