"""The enclave's link to the parent server: announce the attested key, carry one-shot
results, reconnect with backoff.

Nothing here logs a result: only endpoints and transport errors.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from nitrolesion.errors import NitroLesionError, ProtocolError, TransportError
from nitrolesion.transport import (
    FramedConnection, TcpEndpoint, VsockEndpoint, VsockUnavailable, connect)
from nitrolesion.wire.messages import AnnounceAck, EnclaveAnnounce, SealedResult, decode_message

__all__ = ["PARENT_BACKOFF", "STABLE_LINK_SECONDS", "ParentLink"]

log = logging.getLogger("enclave")

#: Backoff for reconnecting to the parent server: first delay, cap.
PARENT_BACKOFF = (0.2, 5.0)
#: A parent link that stayed up this long was healthy: the next reconnect starts the
#: backoff afresh. A link the parent drops sooner (a flapping or hostile host that acks
#: and closes at once) keeps backing off, so it cannot make us re-attest in a tight loop.
STABLE_LINK_SECONDS = 10.0


class ParentLink:
    """The enclave's connection to the parent server: announce the key, carry results.

    One thread (``watch``) owns (re)connecting, with backoff; everyone else only asks
    whether the link is up (``up``, ``wait_up``) and sends on it, so a request never waits
    behind the watcher's retries. A request that finds the link down is told at once
    (TransportError with ``unreachable_text``), and ``wait_up`` cuts the watcher's retry backoff short
    so a server that has just started is found without waiting out the backoff.
    """

    #: Seconds a one-shot request waits for a link that is down: enough for a watcher woken
    #: from its backoff to reach a parent server that has just started, short enough that
    #: the client hears at once when there is none.
    REQUEST_WAIT = 1.0

    def __init__(self, endpoint: VsockEndpoint | TcpEndpoint,
                 announce: Callable[[], EnclaveAnnounce], stopping: threading.Event,
                 timeout: float) -> None:
        """``announce`` makes the announcement (asks the attestation source for a fresh
        document); ``stopping`` is the service's stop flag; ``timeout`` bounds each send
        and the wait for the acknowledgement."""
        self._endpoint = endpoint
        self._announce = announce
        self._stopping = stopping
        self._timeout = timeout
        self._lock = threading.Lock()  # guards _connection and serialises sends on it
        self._connection: FramedConnection | None = None
        self._up = threading.Event()  # set while an announced connection is open
        self._wake = threading.Event()  # ends the watcher's retry backoff early
        self.announced = threading.Event()
        #: Set when the link can never come up here (vsock unusable); the watcher stops
        #: and the owner (app.py) says why and exits.
        self.fatal: VsockUnavailable | None = None
        #: What a one-shot client is told while the link is down (it travels in clear:
        #: it names the command to run, nothing about any image).
        self.unreachable_text = ("the enclave cannot reach the parent server (start "
                                 f"`parent.py server {endpoint.port}`)")

    @property
    def up(self) -> bool:
        """True while the key is announced on an open connection to the parent server."""
        return self._up.is_set()

    def wait_up(self, timeout: float) -> bool:
        """True if the link is up now or comes up within ``timeout`` seconds.

        Wakes a watcher that is backing off between connection attempts, so it tries now.
        """
        if self._up.is_set():
            return True
        if self.fatal is not None or self._stopping.is_set():
            return False
        self._wake.set()
        return self._up.wait(timeout)

    def _connect_and_announce(self) -> FramedConnection:
        connection = connect(self._endpoint, timeout=self._timeout)
        try:
            message = self._announce()
            connection.send(message.TYPE, message.to_body())
            reply = decode_message(connection.receive())
        except (NitroLesionError, OSError):
            connection.close()
            raise
        if not isinstance(reply, AnnounceAck):
            connection.close()
            raise ProtocolError(f"parent answered {type(reply).__name__}, expected AnnounceAck")
        return connection

    def _connect_with_backoff(self) -> FramedConnection | None:
        """Connect and announce, retrying with exponential backoff until it works.

        None when shutting down, or when vsock cannot work here (``fatal`` is then set).
        """
        delay = PARENT_BACKOFF[0]
        while not self._stopping.is_set():
            try:
                return self._connect_and_announce()
            except VsockUnavailable as exc:  # no retry can help; app.py reports it and exits
                self.fatal = exc
                return None
            except (NitroLesionError, OSError) as exc:
                log.info("parent not reachable (%s); retrying in %.1f s", exc, delay)
            self._wake.wait(delay)  # a request waiting for the link cuts this short
            self._wake.clear()
            delay = min(delay * 2, PARENT_BACKOFF[1])
        return None

    def send_result(self, result: SealedResult, wait: float) -> None:
        """Deliver a sealed result on the link, waiting at most ``wait`` seconds for it to
        be up; if the link breaks during the send, once more on the next one.

        Raises TransportError: ``unreachable_text`` if the link is not up in time, the
        send's own error if the second send fails too.
        """
        for attempt in range(2):
            if not self.wait_up(wait):
                raise TransportError(self.unreachable_text)
            with self._lock:
                connection = self._connection
                if connection is None or connection.closed:
                    continue  # lost between wait_up and here: wait for the next one
                try:
                    connection.send(result.TYPE, result.to_body())
                    return
                except TransportError:
                    # Wake the watcher's read with EOF: it drops the link and reconnects.
                    self._up.clear()
                    connection.shutdown_read()
                    if attempt:
                        raise
        raise TransportError(self.unreachable_text)

    def watch(self) -> None:
        """Keep the link up: announce at boot, and again whenever the parent goes away."""
        delay = PARENT_BACKOFF[0]
        while not self._stopping.is_set():
            connection = self._connect_with_backoff()
            if connection is None:
                return
            with self._lock:
                self._connection = connection
            self._up.set()
            self.announced.set()
            log.info("announced public key to parent at %s", self._endpoint)
            up_since = time.monotonic()
            # The parent never sends on this link after the ack; a read returns only when
            # it closes (restart), and then we reconnect and announce again.
            try:
                connection.receive(timeout=None)
                reason = "the parent sent an unexpected frame"
            except (NitroLesionError, OSError) as exc:
                reason = str(exc)
            self._up.clear()
            with self._lock:
                connection.close()
                self._connection = None
            if time.monotonic() - up_since >= STABLE_LINK_SECONDS:
                delay = PARENT_BACKOFF[0]
                log.info("parent link lost (%s); announcing again", reason)
                continue
            # A link the parent dropped soon after the ack keeps backing off (no early
            # wake here), so a flapping host cannot make us re-attest in a tight loop.
            log.info("parent link lost after %.1f s (%s); announcing again in %.1f s",
                     time.monotonic() - up_since, reason, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, PARENT_BACKOFF[1])

    def close(self) -> None:
        """Take the link down for good (at shutdown); ``watch`` returns."""
        self._up.clear()
        self._wake.set()  # a watcher in its backoff sees the stop flag now
        with self._lock:
            if self._connection is not None:
                self._connection.shutdown_read()  # a blocked read in watch() ends too
                self._connection.close()
