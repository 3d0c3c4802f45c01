"""``parent.py web`` without a browser: the committed build, the fail-closed start, the
files and headers it serves, and the relay carrying a real session frame for frame.

The browser itself is tested in test_web_browser.py (headless Chromium).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from harness import PARENT_CLI, PYTHON, ROOT, EnclaveStack, Proc, free_port, tcp_env

WEB = ROOT / "web"
DIST = WEB / "dist"


def sri(data: bytes) -> str:
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()


def test_committed_build_is_what_the_locked_sources_build_to(tmp_path):
    """npm ci (the locked versions) and web/build.mjs in a copy of web/ give dist/ byte for
    byte: the bundle users run is the one the sources describe."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not npm or not node:
        pytest.skip("node and npm are not installed: cannot rebuild web/dist from its sources")
    copy = tmp_path / "web"
    shutil.copytree(WEB, copy, ignore=shutil.ignore_patterns("node_modules", "dist"))
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=copy,
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    built = subprocess.run([node, "build.mjs", "rebuilt"], cwd=copy, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    committed = sorted(p.name for p in DIST.iterdir())
    assert sorted(p.name for p in (copy / "rebuilt").iterdir()) == committed
    for name in committed:
        assert (copy / "rebuilt" / name).read_bytes() == (DIST / name).read_bytes(), (
            f"web/dist/{name} is not what the sources build to: run `npm ci && node build.mjs` in web/")


def test_page_pins_its_bundle_with_sri_and_the_readme_publishes_its_hash():
    html = (DIST / "index.html").read_text()
    bundle = (DIST / "app.js").read_bytes()
    assert f'src="app.js" integrity="{sri(bundle)}"' in html
    assert f'href="style.css" integrity="{sri((DIST / "style.css").read_bytes())}"' in html
    digest = hashlib.sha256(bundle).hexdigest()
    assert digest in (ROOT / "README.md").read_text(), "README must publish the bundle's SHA-256"
    assert digest in (ROOT / "docs" / "WEB.md").read_text()


def test_bundle_pins_the_aws_root_the_python_verifier_pins():
    from nitrolesion.attestation.trust import AWS_NITRO_ROOT_G1_SHA256

    assert AWS_NITRO_ROOT_G1_SHA256 in (DIST / "app.js").read_text()


def test_web_without_a_policy_refuses_like_classify(tmp_path):
    env = tcp_env(tmp_path / "empty-keys")
    for command in (["web", "--port", str(free_port())], ["classify", str(ROOT / "sample_images")]):
        done = subprocess.run([PYTHON, str(PARENT_CLI), *command], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "no PCR policy, so no enclave is trusted" in done.stderr
        assert done.stdout == ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_present):
    """An enclave process with the development authority (no parent server: sessions only)."""
    running = EnclaveStack(tmp_path_factory.mktemp("web"), start_server=False)
    yield running
    running.stop(wait=False)


@pytest.fixture(scope="module")
def web(stack):
    """``parent.py web`` relaying to the stack's enclave, trusting its development root."""
    port = free_port()
    proc = Proc([str(PARENT_CLI), "web", "--port", str(port), "--enclave-port", str(stack.client_port),
                 "--policy", str(stack.tmp / "dev-policy.json"), "--dev-root", str(stack.dev_root)],
                stack.env)
    proc.wait_for(r"Serving the clinic page at http://127\.0\.0\.1:\d+/")
    yield proc, f"http://127.0.0.1:{port}"
    proc.stop()


def test_serves_the_build_with_its_security_headers_and_the_trust_it_was_given(stack, web):
    _, url = web
    for path, name in (("/", "index.html"), ("/app.js", "app.js"), ("/style.css", "style.css")):
        with urllib.request.urlopen(url + path) as response:
            assert response.read() == (DIST / name).read_bytes()
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    with urllib.request.urlopen(url + "/config.json") as response:
        config = json.loads(response.read())
    pinned = json.loads((stack.tmp / "dev-policy.json").read_text())["allowed_pcrs"]
    assert config["policy"]["allowed_pcrs"] == pinned and config["policy"]["any_pcrs"] is False
    from cryptography.hazmat.primitives.serialization import Encoding

    from nitrolesion.attestation.trust import load_pem_roots

    root = load_pem_roots(stack.dev_root)[0].public_bytes(Encoding.DER)
    assert [base64.b64decode(der) for der in config["dev_roots"]] == [root]
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(url + "/../README.md")
    assert missing.value.code == 404


def test_relay_carries_a_session_frame_for_frame(stack, web, test_image_paths):
    """The Python ClientSession over the page's WebSocket: attested, session opened, an
    image classified; the relay changed nothing (the transcript-bound keys would not match)."""
    from websockets.sync.client import connect

    from nitrolesion.protocol import (AttestationReceived, ClientSession, ResultReceived,
                                      SessionEstablished)
    from nitrolesion.wire.frames import FrameDecoder, encode_frame
    from nitrolesion.wire.messages import Attestation

    proc, url = web
    trust = stack.trust()

    def receive(ws):
        decoder = FrameDecoder()
        decoder.feed(ws.recv(timeout=30))
        frame = decoder.next_frame()
        assert frame is not None and decoder.buffered == 0  # one message, one whole frame
        return frame

    with connect(url.replace("http", "ws") + "/ws", max_size=None) as ws:
        session = ClientSession()
        ws.send(encode_frame(*astuple(session.hello())))
        event = session.receive(receive(ws))
        assert isinstance(event, AttestationReceived)
        session.attestation_verified(trust.verify(Attestation(event.public_key, event.document), event.nonce))
        ws.send(encode_frame(*astuple(session.open_session())))
        assert isinstance(session.receive(receive(ws)), SessionEstablished)
        _, frame = session.classify(test_image_paths[0].read_bytes())
        ws.send(encode_frame(*astuple(frame)))
        event = session.receive(receive(ws))
        assert isinstance(event, ResultReceived) and event.payload.prediction.code == "nv"
    proc.wait_for(r"relay #\d+: browser->enclave 3 frames \d+ B, enclave->browser 3 frames \d+ B")
    assert "Melanocytic" not in proc.output  # sizes and timings only


def astuple(frame):
    return frame.type, frame.body


def test_relay_refuses_a_message_that_is_not_one_frame(web):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from nitrolesion.protocol import ClientSession
    from nitrolesion.wire.frames import encode_frame

    proc, url = web
    hello = encode_frame(*astuple(ClientSession().hello()))
    for message, reason in ((hello + hello, "one frame per message"), (hello[:-1], "one frame per message"),
                            ("text", "binary frames only")):
        with connect(url.replace("http", "ws") + "/ws") as ws:
            ws.send(message)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.reason == reason


def _prediction_cases() -> list:
    """A valid prediction map and mutations of it, each field's type, range and the
    refer/refer_reason consistency (what the page must refuse as check_prediction does)."""
    valid = {"code": "mel", "name": "Melanoma", "confidence": 0.6,
             "probabilities": {"mel": 0.6, "nv": 0.3, "bkl": 0.1},
             "malignant": 0.62, "refer": True, "refer_reason": "malignant"}
    changes = [
        {}, {"refer": False, "refer_reason": None}, {"refer_reason": "not_a_lesion"},
        {"refer": False}, {"refer": False, "refer_reason": "not_a_lesion"},
        {"refer_reason": None}, {"refer_reason": "benign"}, {"refer": "true"}, {"refer": 1},
        {"malignant": 1.5}, {"malignant": -0.1}, {"malignant": "0.5"}, {"malignant": True},
        {"malignant": None}, {"malignant": 0}, {"malignant": 1},
        {"confidence": 2}, {"code": 7}, {"code": "x" * 33}, {"name": "é" * 128}, {"name": "é" * 129},
        {"probabilities": {}}, {"probabilities": []}, {"probabilities": {"mel": 1.1}},
        {"probabilities": {f"c{i}": 0.05 for i in range(17)}},
    ]
    cases = [{**valid, **change} for change in changes]
    missing = dict(valid)
    del missing["malignant"]
    return cases + [missing, {**valid, "extra": 1}, [], None]


def test_page_refuses_the_predictions_check_prediction_refuses(tmp_path):
    """web/src/prediction.js under Node and nitrolesion's check_prediction on the same
    maps: the same ones accepted, the same message for each one refused."""
    from nitrolesion.errors import ProtocolError
    from nitrolesion.wire.messages import check_prediction

    node = shutil.which("node")
    if not node:
        pytest.skip("node is not installed: cannot run web/src/prediction.js")
    cases = _prediction_cases()
    module = json.dumps((WEB / "src" / "prediction.js").as_uri())
    script = (f"import {{ predictionProblem }} from {module}; import {{ readFileSync }} from 'node:fs';"
              " console.log(JSON.stringify(JSON.parse(readFileSync(0, 'utf8')).map(predictionProblem)));")
    done = subprocess.run([node, "--input-type=module", "-e", script], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    python = []
    for case in cases:
        try:
            check_prediction(case)
            python.append(None)
        except ProtocolError as exc:
            python.append(str(exc))
    assert sum(p is None for p in python) >= 5 and sum(p is not None for p in python) >= 20
    for case, js, py in zip(cases, page, python):
        assert js == py, case
