"""``parent.py web``: the clinic's page and its blind relay to the enclave, on one port.

Serves three things and a WebSocket:

* ``/`` the page, ``/app.js`` its committed bundle (built from web/src, Subresource
  Integrity in the page), ``/style.css``;
* ``/config.json``: what the page verifies against: the PCR policy (``--policy`` or the
  installed one), the development roots given with ``--dev-root`` (the AWS root's
  fingerprint is compiled into the bundle), and the provenance fields of the CSV;
* ``/ws``: each WebSocket is relayed to a new enclave connection (web_relay.Relay).

The page does every security check itself (docs/WEB.md): this process never sees a key, an
image or a result in clear. Trust fails closed as for ``client``/``classify``: no policy,
no page (unless ``--insecure-any-enclave``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from http import HTTPStatus
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from nitrolesion import __version__
from nitrolesion.errors import UsageError
from nitrolesion.limits import PROJECT_ROOT
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH
from nitrolesion.parent.classify import policy_provenance, sha256_of_file
from nitrolesion.parent.options import transport_of, trust_of
from nitrolesion.parent.web_relay import MAX_MESSAGE, Relay
from nitrolesion.transport import check_port, endpoint_for

#: The committed build of web/ (web/build.mjs writes it; tests/test_web.py rebuilds it).
DIST = PROJECT_ROOT / "web" / "dist"
#: Address the page binds by default: this machine only (put TLS in front to serve others).
DEFAULT_BIND = "127.0.0.1"
DEFAULT_WEB_PORT = 8080
#: WebSockets relayed at once; more are answered 503 (each holds an enclave connection).
MAX_RELAYS = 64
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
#: The page needs only its own files and its own WebSocket; nothing inline, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data: blob:; connect-src 'self' ws: wss:; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def page_config(args) -> dict:
    """What the page verifies against and records: policy, extra roots, provenance.

    Raises NoPolicy (exit 1, the same line as client/classify) without a policy, unless
    --insecure-any-enclave; UsageError for an unreadable --policy or --dev-root.
    """
    trust = trust_of(args)
    policy = trust.policy
    served = policy.to_dict()
    served["any_pcrs"] = policy.any_pcrs
    return {
        "version": __version__,
        "policy": served,
        "policy_provenance": policy_provenance(args),
        "dev_roots": [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()
                      for cert in trust.extra_roots],
        "model_file_local": str(DEFAULT_MODEL_PATH),
        "model_sha256_local": sha256_of_file(DEFAULT_MODEL_PATH),
    }


class WebServer:
    """The page's files, its config and the relay, served by the ``websockets`` library."""

    def __init__(self, config: dict, relay: Relay, dist: Path = DIST) -> None:
        self.relay = relay
        missing = [name for name, _ in STATIC.values() if not (dist / name).is_file()]
        if missing:
            raise UsageError(f"the page's build is missing {', '.join(sorted(set(missing)))} in {dist}")
        self.files = {path: ((dist / name).read_bytes(), kind) for path, (name, kind) in STATIC.items()}
        self.files["/config.json"] = (json.dumps(config).encode(), "application/json")
        self._slots = asyncio.Semaphore(MAX_RELAYS)

    def respond(self, connection, request):
        """process_request hook: static files over plain HTTP; /ws goes on to the upgrade."""
        from websockets.datastructures import Headers
        from websockets.http11 import Response

        path = request.path.split("?", 1)[0]
        if path == "/ws":
            if self._slots.locked():
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
            return None
        if path not in self.files:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        body, kind = self.files[path]
        headers = Headers({"Content-Type": kind, "Content-Length": str(len(body)), **SECURITY_HEADERS})
        if path == "/config.json":
            # Public facts; readable by a copy of the page saved and opened from disk.
            headers["Access-Control-Allow-Origin"] = "*"

        return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, body)

    async def relay_one(self, websocket) -> None:
        async with self._slots:
            await self.relay.handle(websocket)

    async def serve(self, host: str, port: int, ready) -> None:
        from websockets.asyncio.server import serve

        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        async with serve(self.relay_one, host, port, process_request=self.respond,
                         max_size=MAX_MESSAGE, compression=None, server_header=None,
                         ping_interval=None) as server:
            bound = server.sockets[0].getsockname()
            ready(bound[0], bound[1])
            await stop


def run_web(args) -> int:
    """``parent.py web``: refuse without trust, then serve until SIGINT/SIGTERM."""
    try:
        import websockets  # noqa: F401 - parent-only dependency, say so if it is missing
    except ImportError as exc:
        raise UsageError("`parent.py web` needs the websockets package: "
                         "pip install -r requirements.txt") from exc
    check_port(args.enclave_port, "--enclave-port")
    config = page_config(args)
    endpoint = endpoint_for(transport_of(args), args.cid, args.enclave_port, args.host)
    server = WebServer(config, Relay(endpoint))

    def ready(host: str, port: int) -> None:
        shown = f"[{host}]" if ":" in host else host
        print(f"Serving the clinic page at http://{shown}:{port}/ (relay to the enclave at "
              f"{endpoint}); Ctrl-C stops", flush=True)
        if config["dev_roots"]:
            print("WARNING: --dev-root: the page trusts a development root; its attestation "
                  "proves nothing about hardware", file=sys.stderr, flush=True)

    asyncio.run(server.serve(args.bind, args.port, ready))
    return 0
