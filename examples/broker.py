"""An embedded, pure-Python MQTT broker (amqtt) on a free loopback port, for the demo on a laptop.

Production devices talk to a real broker cluster (mosquitto, EMQX, HiveMQ); the test suite uses a real mosquitto.
This one exists so that the demo needs nothing but `pip install`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """amqtt running on its own event loop thread; ``with EmbeddedBroker() as b: ... b.url``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._broker: Any = None
        self._error: BaseException | None = None

    def __enter__(self) -> EmbeddedBroker:
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        logging.getLogger("transitions").setLevel(logging.ERROR)
        threading.Thread(target=self._serve, name="amqtt", daemon=True).start()
        if not self._ready.wait(15):
            raise RuntimeError("embedded MQTT broker did not start within 15 s")
        if self._error is not None:
            raise RuntimeError(f"embedded MQTT broker failed to start: {self._error}") from self._error
        return self

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            from amqtt.broker import Broker

            # Amqtt must be constructed inside a running loop (STACK.md).
            self._broker = Broker(
                {
                    "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                    "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
                }
            )
            await self._broker.start()

        try:
            self._loop.run_until_complete(start())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def __exit__(self, *exc: object) -> None:
        if self._broker is not None:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
