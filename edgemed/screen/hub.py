"""The page's live connections: each SSE client gets a short queue the push thread fills and its handler drains.

The push thread never waits for a browser: a client that reads slowly loses its oldest queued events (a newer
frame replaces an older one anyway), and one that is gone is dropped when its handler's write fails.
"""

from __future__ import annotations

import threading
from collections import deque

#: Events queued per client before the oldest is dropped: a few frames' worth, enough for a status and a map.
QUEUE_EVENTS = 8
#: At most this many pages at once: the device's own kiosk browser, a tablet, a technician's laptop, one spare.
MAX_CLIENTS = 4


class Client:
    """One connected page: a bounded queue of encoded events."""

    def __init__(self) -> None:
        self._events: deque[bytes] = deque(maxlen=QUEUE_EVENTS)
        self._ready = threading.Condition()
        self.closed = False

    def put(self, event: bytes) -> None:
        """Queue one event (the oldest queued one is dropped when the queue is full)."""
        with self._ready:
            self._events.append(event)
            self._ready.notify()

    def next(self, timeout_s: float) -> bytes | None:
        """The next event, or None after ``timeout_s`` without one (or once the client is closed)."""
        with self._ready:
            if not self._events and not self.closed:
                self._ready.wait(timeout_s)
            return self._events.popleft() if self._events and not self.closed else None

    def close(self) -> None:
        """Wake the handler so that it ends the response."""
        with self._ready:
            self.closed = True
            self._ready.notify_all()


class Hub:
    """The connected clients, at most ``max_clients``."""

    def __init__(self, max_clients: int = MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self._clients: list[Client] = []
        self._lock = threading.Lock()
        self._closed = False

    def join(self) -> Client | None:
        """A new client, or None when ``max_clients`` are already connected (or the hub is closed)."""
        with self._lock:
            if self._closed or len(self._clients) >= self.max_clients:
                return None
            client = Client()
            self._clients.append(client)
            return client

    def leave(self, client: Client) -> None:
        """Forget a client whose connection ended."""
        client.close()
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def count(self) -> int:
        """How many clients are connected."""
        with self._lock:
            return len(self._clients)

    def broadcast(self, event: bytes) -> None:
        """Queue one event for every client."""
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.put(event)

    def close(self) -> None:
        """End every client's response and refuse new ones."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
