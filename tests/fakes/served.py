"""The start and stop that the fake HTTP servers on 127.0.0.1 share."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Self


class ServedInThread:
    """A fake that owns a :class:`ThreadingHTTPServer` (``self._server``, bound in the subclass's
    ``__init__``): :meth:`start` serves it from a daemon thread, :meth:`stop` shuts it down and
    closes its socket, and ``with`` does both."""

    _server: ThreadingHTTPServer
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
