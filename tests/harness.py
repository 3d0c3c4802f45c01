"""Real processes for integration tests: the enclave app and the parent server over TCP.

Nothing here is mocked: ``Proc`` runs ``enclave/app.py`` or ``parent/parent.py`` as a child
process with ENCLAVE_TRANSPORT=tcp, captures its output line by line and lets a test wait
for a line. ``EnclaveStack`` wires a parent server process and an enclave process the
way the README's three commands do, with the development attestation authority.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nitrolesion.attestation.policy import AttestationPolicy
from nitrolesion.transport import free_tcp_port as free_port
PYTHON = sys.executable
ENCLAVE_APP = ROOT / "enclave" / "app.py"
PARENT_CLI = ROOT / "parent" / "parent.py"


def tcp_env(key_dir: Path | None = None) -> dict:
    env = dict(os.environ, ENCLAVE_TRANSPORT="tcp", PYTHONUNBUFFERED="1")
    if key_dir is not None:
        env["NITROLESION_KEY_DIR"] = str(key_dir)
    return env


class Proc:
    """A child process whose combined output is collected as lines."""

    def __init__(self, args: list[str], env: dict, cwd: Path = ROOT) -> None:
        self.args = args
        self.process = subprocess.Popen([PYTHON, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match:
        """Wait until a line (from index ``start``) matches ``pattern``; fail loudly if not."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._pending()):
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout} s; "
                        f"exit={self.process.poll()}; output:\n{self.output}")
                self._changed.wait(min(remaining, 0.2))

    def _pending(self) -> bool:
        return not self.process.stdout.closed and self.process.poll() is None

    def status_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak) of the process in KiB, from /proc/PID/status."""
        values = {}
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0])
        return values

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class EnclaveStack:
    """``parent.py server`` + ``enclave/app.py`` as real processes over TCP loopback.

    Set up as a user would for a local run: the development authority is created first,
    its PCRs are installed as the key folder's policy with ``parent.py trust``, and the
    server trusts the development root (``--dev-root``), so it verifies the enclave's
    announcement like on Nitro.
    """

    def __init__(self, tmp: Path, enclave_args: tuple[str, ...] = (), start_server: bool = True,
                 server_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.server_args = tuple(server_args)
        self.key_dir = tmp / "parent-keys"
        self.dev_dir = tmp / "dev-authority"
        self.parent_port = free_port()
        self.client_port = free_port()
        self.env = tcp_env(self.key_dir)
        self.server: Proc | None = None
        self.enclave: Proc | None = None
        self.install_policy()
        if start_server:
            self.start_server()
        self.start_enclave(*enclave_args)

    def install_policy(self) -> None:
        """Create the development authority and pin its PCRs in the key folder."""
        from nitrolesion.attestation.dev_authority import DevAttestationAuthority
        from nitrolesion.enclave_image import image_files

        #: The authority as measured now: its PCRs are the ones the stack trusts.
        self.authority = DevAttestationAuthority.load_or_create(self.dev_dir, image_files(ROOT), base=ROOT)
        policy = self.tmp / "dev-policy.json"
        policy.write_text(json.dumps(AttestationPolicy.for_dev_pcrs(self.authority.pcrs).to_dict()))
        done = self.parent_cli("trust", str(policy))
        assert done.returncode == 0, done.stderr

    def start_server(self) -> Proc:
        self.server = Proc([str(PARENT_CLI), "server", str(self.parent_port),
                            "--dev-root", str(self.dev_root), *self.server_args], self.env)
        self.server.wait_for(r"Server ready!")
        return self.server

    def start_enclave(self, *extra: str) -> Proc:
        self.enclave = Proc([str(ENCLAVE_APP), "3", str(self.client_port), str(self.parent_port),
                             "--dev-attestation", str(self.dev_dir), *extra], self.env)
        self.enclave.wait_for(r"ready in")
        if self.server is not None:
            self.server.wait_for(r"Enclave public key received")
        return self.enclave

    @property
    def dev_root(self) -> Path:
        return self.dev_dir / "dev_root.pem"

    def parent_cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``parent.py ARGS`` to completion with this stack's environment."""
        return subprocess.run([PYTHON, str(PARENT_CLI), *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def trust(self):
        """A Trust pinned to this enclave's development PCRs and root."""
        from nitrolesion.attestation.trust import load_pem_roots
        from nitrolesion.parent.enclave_client import Trust

        return Trust(AttestationPolicy.for_dev_pcrs(self.authority.pcrs), load_pem_roots(self.dev_root))

    def endpoint(self):
        from nitrolesion.transport import TcpEndpoint

        return TcpEndpoint(self.client_port)

    def stop(self, wait: bool = True) -> None:
        """SIGTERM the enclave, then the server, each waited for (killed after 20 s).

        With ``wait=False`` (fixture teardowns) a thread does that while the caller goes
        on: the enclave takes ~0.5 s to notice the signal between two accepts, time the next
        test can use. :func:`wait_for_stopped` joins those threads (conftest does at the end
        of the session)."""
        procs = [proc for proc in (self.enclave, self.server) if proc is not None]
        if wait:
            for proc in procs:
                proc.stop()
            return
        stopper = threading.Thread(target=lambda: [proc.stop() for proc in procs],
                                   name="stack-stop", daemon=True)
        stopper.start()
        _stopping.append(stopper)


#: Threads stopping stacks in the background (EnclaveStack.stop(wait=False)).
_stopping: list[threading.Thread] = []


def wait_for_stopped(timeout: float = 60.0) -> None:
    """Wait until every stack stopped with ``wait=False`` has exited."""
    deadline = time.monotonic() + timeout
    while _stopping:
        _stopping.pop().join(max(0.0, deadline - time.monotonic()))


def write_dev_policy(stack: EnclaveStack, path: Path) -> Path:
    """A policy JSON file pinning the stack's development PCRs, as a user would write one."""
    path.write_text(json.dumps(stack.trust().policy.to_dict()))
    return path
