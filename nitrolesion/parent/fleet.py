"""``parent.py classify --enclave ...``: one batch spread over many enclaves, each attested.

Every enclave is a separate member: its own connection, its own HELLO with its own nonce,
its own verification against the same trust (policy and roots), its own session. Nothing
is shared between enclaves but the queue of images still to do:

* **work stealing**: each member pulls the next image from one shared queue whenever its
  window has room, so a faster enclave takes more;
* **fail-over**: when a member's connection breaks or times out mid-batch, the images it
  had taken and not answered go back to the front of the queue and the others take them;
* **refusal**: a member whose attestation (or handshake) fails is refused, named in the
  report, and gets nothing; one that cannot be reached, or answers only with an ERROR, is
  reported as unreachable.

The answers are the enclaves' own (same image, same model: the same row as with one
enclave); each outcome says which member classified it, for the results' provenance.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from nitrolesion.errors import NitroLesionError, RemoteError, TransportError, UsageError
from nitrolesion.parent.enclave_client import (
    DEFAULT_TIMEOUT, DEFAULT_WINDOW, EnclaveClient, ImageOutcome, Trust)
from nitrolesion.transport import (
    MIN_ENCLAVE_CID, SOCKETS, TcpEndpoint, Transport, VsockEndpoint, check_cid, check_port)
from nitrolesion.wire.messages import printable

#: Error code of rows no enclave could classify (all were refused, unreachable or failed).
NO_ENCLAVE = "NO_ENCLAVE"


# -- endpoints ------------------------------------------------------------------------------
def parse_enclave(text: str) -> VsockEndpoint | TcpEndpoint:
    """``vsock:CID:PORT`` or ``tcp:HOST:PORT`` (``tcp:[v6]:PORT`` too) as an endpoint.
    Raises UsageError naming the expected forms."""
    kind, _, rest = text.strip().partition(":")
    address, _, port = rest.rpartition(":")
    forms = "expected vsock:CID:PORT or tcp:HOST:PORT"
    if kind not in ("vsock", "tcp") or not address or not port.isdigit():
        raise UsageError(f"--enclave {text!r}: {forms}")
    port_number = check_port(int(port), f"--enclave {text} port")
    if kind == "vsock":
        if not address.isdigit():
            raise UsageError(f"--enclave {text!r}: the CID must be a number; {forms}")
        return VsockEndpoint(check_cid(int(address), f"--enclave {text} CID", MIN_ENCLAVE_CID),
                             port_number)
    return TcpEndpoint(port_number, address.strip("[]"))


def read_enclaves_file(path: Path) -> list[str]:
    """The endpoints of an --enclaves-file: one per line; blank lines and ``#`` comments
    are skipped. Raises UsageError if it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--enclaves-file {path}: cannot be read ({exc})") from exc
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [line for line in lines if line]


def fleet_endpoints(enclaves: list[str], enclaves_file: Path | None
                    ) -> list[VsockEndpoint | TcpEndpoint]:
    """Every --enclave, then every line of --enclaves-file, parsed. An endpoint may come
    more than once: behind a load balancer each connection attests whichever enclave it
    lands on, so one address can stand for several enclaves (the rows' module ids say
    which one answered)."""
    texts = list(enclaves) + (read_enclaves_file(enclaves_file) if enclaves_file else [])
    endpoints = [parse_enclave(text) for text in texts]
    if enclaves_file is not None and not endpoints:
        raise UsageError(f"--enclaves-file {enclaves_file} names no enclave")
    return endpoints


# -- members --------------------------------------------------------------------------------
@dataclass
class Member:
    """One enclave of the fleet and what became of it."""

    endpoint: VsockEndpoint | TcpEndpoint
    copy: int = 1             # the n-th connection to the same endpoint (a load balancer)
    status: str = "waiting"   # attested | refused | unreachable | failed | done
    reason: str = ""
    module_id: str = ""
    pcrs: dict[int, str] = field(default_factory=dict)
    attested_utc: str = ""
    classified: int = 0       # outcomes this enclave answered
    failed_over: int = 0      # its images that went to other enclaves when it failed
    attestation: object = None  # the AttestationResult, once verified

    @property
    def name(self) -> str:
        """The endpoint, with ``#n`` for the n-th connection to the same one (n >= 2)."""
        return str(self.endpoint) + (f"#{self.copy}" if self.copy > 1 else "")

    def row_tag(self) -> dict:
        """What each result row records about the enclave that classified it."""
        return {"endpoint": self.name, "module_id": self.module_id,
                **{f"pcr{i}": value for i, value in sorted(self.pcrs.items())}}

    def report(self) -> dict:
        """This member's part of the batch summary."""
        entry = {"enclave": self.name, "status": self.status, "module_id": self.module_id or None,
                 "classified": self.classified, "failed_over": self.failed_over}
        if self.reason:
            entry["reason"] = self.reason
        return entry


@dataclass(frozen=True)
class FleetEvent:
    """What a member reports to the batch: ``kind`` is attested, refused, unreachable,
    failed or outcome (with ``outcome`` set; ``member`` None for an unreadable file)."""

    kind: str
    member: Member | None
    outcome: ImageOutcome | None = None


class _Dispatch:
    """The shared queue of image indexes, and how many are in flight anywhere."""

    def __init__(self, indexes: list[int]) -> None:
        self._pending = deque(indexes)
        self._in_flight = 0
        self._stopped = False
        self._changed = threading.Condition()

    def take(self) -> int | None:
        """The next index to send, or None when the queue is empty (or stopped)."""
        with self._changed:
            if self._stopped or not self._pending:
                return None
            self._in_flight += 1
            return self._pending.popleft()

    def finish(self) -> None:
        """One taken index was answered."""
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()

    def give_back(self, indexes: list[int]) -> None:
        """Taken indexes a failed member did not answer: to the front, in order."""
        with self._changed:
            self._in_flight -= len(indexes)
            self._pending.extendleft(reversed(indexes))
            self._changed.notify_all()

    def wait_for_work(self) -> bool:
        """Block until there is an image to take (True) or none can come any more (False:
        the queue is empty and nothing is in flight that could be given back)."""
        with self._changed:
            while not self._pending and self._in_flight and not self._stopped:
                self._changed.wait()
            return bool(self._pending) and not self._stopped

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def left(self) -> list[int]:
        with self._changed:
            return list(self._pending)


class Fleet:
    """Classifies one batch over many enclaves (see the module doc).

    ``load(index)`` gives an image's bytes, or an exception for a file that cannot be sent
    (it becomes that row's error, from no enclave); it may be called again for an image
    that fails over, so images need not all be held in memory.
    """

    def __init__(self, endpoints: list[VsockEndpoint | TcpEndpoint], trust: Trust, *,
                 timeout: float = DEFAULT_TIMEOUT, window: int = DEFAULT_WINDOW,
                 transport: Transport = SOCKETS) -> None:
        if not endpoints:
            raise UsageError("a fleet needs at least one --enclave")
        self.members = [Member(endpoint, copy=endpoints[:number].count(endpoint) + 1)
                        for number, endpoint in enumerate(endpoints)]
        self.trust = trust
        self.timeout = timeout
        self.window = window
        self.transport = transport
        self._dispatch: _Dispatch | None = None
        self._clients: list[EnclaveClient] = []
        self._lock = threading.Lock()

    def classify(self, count: int, load: Callable[[int], bytes | Exception]
                 ) -> Iterator[FleetEvent]:
        """Run the batch of ``count`` images; yields events as they happen (from this
        thread), each image's outcome exactly once. Images that no enclave could classify
        come last as NO_ENCLAVE errors. Raises TransportError if no enclave was attested."""
        dispatch = self._dispatch = _Dispatch(list(range(count)))
        events: "queue.Queue[FleetEvent | None]" = queue.Queue()
        threads = [threading.Thread(target=self._serve, args=(member, load, events),
                                    name=f"fleet-{member.name}", daemon=True)
                   for member in self.members]
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                event = events.get()
                if event is None:
                    running -= 1
                    continue
                yield event
        finally:
            dispatch.stop()  # an interrupted batch: members take nothing more
        if not any(member.attestation is not None for member in self.members):
            raise TransportError("no enclave of the fleet could be used: " + "; ".join(
                f"{m.name} {m.status}: {m.reason}" for m in self.members))
        for index in dispatch.left():
            yield FleetEvent("outcome", None, ImageOutcome(index, error=(
                NO_ENCLAVE, "not classified: every enclave of the fleet failed or was refused")))

    def close(self) -> None:
        """Stop the batch and close every member's connection (Ctrl-C)."""
        if self._dispatch is not None:
            self._dispatch.stop()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()

    def report(self) -> dict:
        """The fleet's part of the summary: each member, the refused ones, fail-overs."""
        return {"enclaves": [member.report() for member in self.members],
                "refused": [m.name for m in self.members if m.status == "refused"],
                "unreachable": [m.name for m in self.members if m.status == "unreachable"],
                "failed": [m.name for m in self.members if m.status == "failed"],
                "failed_over": sum(m.failed_over for m in self.members)}

    def provenance(self, describe: Callable[[object], dict]) -> dict:
        """For the results file: every attested enclave as ``describe(attestation result)``
        says (module id, PCRs, ...), by endpoint, and those refused or unreachable (they
        classified nothing)."""
        attested = {m.name: describe(m.attestation)
                    for m in self.members if m.attestation is not None}
        return {"enclaves": attested,
                "enclaves_not_used": {m.name: f"{m.status}: {m.reason}" for m in self.members
                                      if m.attestation is None}}

    # -- one member -----------------------------------------------------------------------
    def _serve(self, member: Member, load, events: queue.Queue) -> None:
        client = EnclaveClient(member.endpoint, self.trust, timeout=self.timeout,
                               transport=self.transport)
        with self._lock:
            self._clients.append(client)
        try:
            if self._attest(member, client, events):
                self._classify(member, client, load, events)
        finally:
            client.close()
            events.put(None)

    def _attest(self, member: Member, client: EnclaveClient, events: queue.Queue) -> bool:
        try:
            result = client.attest()  # its own connection, its own nonce, the same trust
        except (TransportError, RemoteError) as exc:  # nothing or an ERROR answered
            member.status, member.reason = "unreachable", printable(exc.diagnostic())
            events.put(FleetEvent("unreachable", member))
            return False
        except NitroLesionError as exc:  # the document, its key or the handshake failed
            member.status, member.reason = "refused", printable(exc.diagnostic())
            events.put(FleetEvent("refused", member))
            return False
        member.attestation = result
        member.module_id = printable(result.module_id)
        member.pcrs = {i: result.pcrs[i].hex() for i in (0, 1, 2) if i in result.pcrs}
        member.status = "attested"
        events.put(FleetEvent("attested", member))
        return True

    def _classify(self, member: Member, client: EnclaveClient, load, events: queue.Queue) -> None:
        dispatch = self._dispatch
        taken: list[int] = []
        answered: set[int] = set()
        try:
            client.open_session()
            while dispatch.wait_for_work():
                taken.clear()
                answered.clear()
                for outcome in client.classify_many(self._feed(load, taken, events),
                                                    window=self.window):
                    index = taken[outcome.index]
                    answered.add(outcome.index)
                    member.classified += 1
                    dispatch.finish()
                    events.put(FleetEvent("outcome", member,
                                          ImageOutcome(index, outcome.result, outcome.error)))
            member.status = "done"
        except NitroLesionError as exc:
            unanswered = [index for position, index in enumerate(taken) if position not in answered]
            member.failed_over = len(unanswered)
            member.status, member.reason = "failed", printable(exc.diagnostic())
            dispatch.give_back(unanswered)
            events.put(FleetEvent("failed", member))

    def _feed(self, load, taken: list[int], events: queue.Queue) -> Iterator[bytes]:
        """Images for classify_many, pulled from the shared queue as the window has room;
        ``taken`` maps classify_many's positions (images it was given) to batch indexes."""
        dispatch = self._dispatch
        while (index := dispatch.take()) is not None:
            image = load(index)
            if isinstance(image, Exception):  # an unreadable file: its row, from no enclave
                dispatch.finish()
                code = getattr(image, "code", "UNREADABLE")
                events.put(FleetEvent("outcome", None, ImageOutcome(index, error=(code, str(image)))))
                continue
            taken.append(index)
            yield image


def summary_lines(report: dict) -> list[str]:
    """The fleet's summary for people: one line per enclave, then refusals and fail-overs."""
    lines = []
    for entry in report["enclaves"]:
        line = f"  enclave {entry['enclave']}: {entry['status']}, {entry['classified']} classified"
        if entry["module_id"]:
            line += f", module {entry['module_id']}"
        if entry["failed_over"]:
            line += f", {entry['failed_over']} images failed over to the others"
        if entry.get("reason"):
            line += f" ({entry['reason']})"
        lines.append(line)
    refused = ", ".join(report["refused"]) or "none"
    lines.append(f"  refused (failed attestation, sent nothing): {refused}; "
                 f"images failed over: {report['failed_over']}")
    return lines


def event_line(event: FleetEvent) -> str:
    """One line for an enclave's attestation, refusal, unreachability or failure."""
    member = event.member
    if event.kind == "attested":
        pcrs = ", ".join(f"PCR{i} {value[:16]}..." for i, value in sorted(member.pcrs.items()))
        return f"Enclave {member.name} attested: module {member.module_id}; {pcrs}"
    if event.kind == "refused":
        return f"Enclave {member.name} REFUSED, sent nothing: {member.reason}"
    if event.kind == "unreachable":
        return f"Enclave {member.name} unreachable, sent nothing: {member.reason}"
    return (f"Enclave {member.name} failed mid-batch ({member.reason}): its "
            f"{member.failed_over} unanswered images go to the other enclaves")


#: Columns a fleet adds to a CSV results file (the PCRs of each enclave are in the
#: file's ``# enclaves:`` provenance line, by endpoint).
CSV_COLUMNS = ["enclave", "enclave_module_id"]


def csv_fields(row: dict) -> dict:
    """A fleet row's CSV_COLUMNS values (empty for a file no enclave saw)."""
    enclave = row.get("enclave") or {}
    return {"enclave": enclave.get("endpoint", ""), "enclave_module_id": enclave.get("module_id", "")}


def endpoints_of(args) -> list[VsockEndpoint | TcpEndpoint]:
    """The fleet the command line names (--enclave, --enclaves-file); empty for the single
    enclave of --cid/--port. Raises UsageError for an endpoint that cannot be."""
    enclaves, enclaves_file = getattr(args, "enclave", None) or [], getattr(args, "enclaves_file", None)
    if not enclaves and enclaves_file is None:
        return []
    return fleet_endpoints(enclaves, enclaves_file)
