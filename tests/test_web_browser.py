"""The clinic's page in a real browser: Debian's headless Chromium driven by Selenium, against
a real enclave process over TCP with the development attestation authority.

Between ``parent.py web`` and the enclave sits ``CapturingProxy``: every byte the relay
carries passes through it, so the tests see what a host sees (and, in one test, it plays the
host in the middle). Skipped only where Chromium and its driver are not installed
(``python3 dev.py test`` installs them with apt when it runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from harness import PARENT_CLI, ROOT, EnclaveStack, Proc, free_port

from nitrolesion.wire.frames import FrameDecoder, MessageType, encode_frame

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
#: The flags that work in containers and CI: no sandbox (root), no network of its own.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1100,1400")
WAIT = 60.0


class CapturingProxy:
    """A TCP relay between ``parent.py web`` and the enclave that records every frame each
    way, per connection; ``swap_key`` makes it replace the key offered beside the
    attestation document (a host in the middle)."""

    def __init__(self, target_port: int, swap_key: bytes | None = None) -> None:
        self.target_port = target_port
        self.swap_key = swap_key
        self.connections: list[dict[str, list]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            record = {"up": [], "down": []}
            with self._lock:
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record["up"], False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, record["down"], True), daemon=True).start()

    def _pump(self, source, sink, frames: list, down: bool) -> None:
        decoder = FrameDecoder()
        try:
            while data := source.recv(65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    if down and frame.type == MessageType.ATTESTATION and self.swap_key:
                        frame = self._swapped(frame)
                    frames.append(frame)
                    sink.sendall(encode_frame(frame.type, frame.body))
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _swapped(self, frame):
        from nitrolesion.wire.messages import Attestation, decode_message

        offered = decode_message(frame)
        forged = Attestation(self.swap_key, offered.document)
        return type(frame)(forged.TYPE, forged.to_body())

    def since(self, start: int) -> list[dict[str, list]]:
        with self._lock:
            return list(self.connections[start:])

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def chromium():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver; "
                    "`python3 dev.py test` does it when run as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="nitrolesion-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, model_present):
    running = EnclaveStack(tmp_path_factory.mktemp("web-browser"), start_server=False)
    yield running
    running.stop(wait=False)


class Site:
    """``parent.py web`` with a policy, behind a capturing proxy to the stack's enclave."""

    def __init__(self, stack, policy: Path, swap_key: bytes | None = None) -> None:
        self.proxy = CapturingProxy(stack.client_port, swap_key)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.proc = Proc([str(PARENT_CLI), "web", "--port", str(port), "--enclave-port", str(self.proxy.port),
                          "--policy", str(policy), "--dev-root", str(stack.dev_root)], stack.env)
        self.proc.wait_for(r"Serving the clinic page")

    def stop(self) -> None:
        self.proc.stop()
        self.proxy.close()


@pytest.fixture(scope="module")
def site(stack):
    running = Site(stack, stack.tmp / "dev-policy.json")
    yield running
    running.stop()


def open_page(driver, url: str) -> str:
    """Load the page and wait until it verified or refused the attestation; its state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    box = driver.find_element(By.ID, "attestation")
    WebDriverWait(driver, WAIT).until(lambda _: box.get_attribute("data-state") in ("verified", "failed"))
    return box.get_attribute("data-state")


def choose(driver, paths: list[Path]) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "images").send_keys("\n".join(str(p) for p in paths))


def results(driver, count: int) -> list[dict]:
    """Wait for ``count`` results; each as its data attributes."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = """return Array.from(document.querySelectorAll('[data-testid=result]'), e => ({...e.dataset}))"""
    WebDriverWait(driver, WAIT).until(lambda d: len(d.execute_script(script)) >= count)
    return driver.execute_script(script)


def classify_json(stack, image: Path) -> dict:
    done = stack.parent_cli("classify", str(image), "--json", "--port", str(stack.client_port),
                            "--policy", str(stack.tmp / "dev-policy.json"), "--dev-root", str(stack.dev_root))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_page_classifies_a_sample_as_parent_classify_does(chromium, stack, site, test_image_paths):
    """The cross-check: a session the page opened with WebCrypto works against the real
    enclave, and its answer is classify's, to 1e-6."""
    image = test_image_paths[1]  # the melanoma sample
    assert open_page(chromium, site.url) == "verified"
    choose(chromium, [image])
    [shown] = results(chromium, 1)
    expected = classify_json(stack, image)
    assert shown["file"] == image.name and shown["code"] == expected["code"]
    assert abs(float(shown["confidence"]) - expected["confidence"]) <= 1e-6
    probabilities = json.loads(shown["probabilities"])
    assert probabilities.keys() == expected["probabilities"].keys()
    for code, p in expected["probabilities"].items():
        assert abs(probabilities[code] - p) <= 1e-6, code
    assert abs(float(shown["malignant"]) - expected["malignant"]) <= 1e-6
    assert shown["refer"] == ("true" if expected["refer"] else "false")
    assert shown.get("referReason") == expected["refer_reason"]  # absent when not referred
    from selenium.webdriver.common.by import By
    card = chromium.find_element(By.CSS_SELECTOR, "[data-testid=result]")
    assert expected["label"] in card.text
    assert ("Refer to a dermatologist" in card.text) == expected["refer"]
    assert "research demonstrator, not a medical device" in chromium.find_element(By.TAG_NAME, "body").text


def test_a_photo_that_is_not_a_lesion_is_shown_as_referred_not_a_lesion(chromium, stack, site):
    """The committed CC0 coffee photo: the page shows refer, reason not_a_lesion, as
    classify says for it, and tells the person why."""
    photo = ROOT / "tests" / "fixtures" / "not-a-lesion" / "coffee.jpg"
    assert open_page(chromium, site.url) == "verified"
    choose(chromium, [photo])
    [shown] = results(chromium, 1)
    expected = classify_json(stack, photo)
    assert (expected["refer"], expected["refer_reason"]) == (True, "not_a_lesion")
    assert shown["file"] == photo.name and shown["code"] == expected["code"]
    assert (shown["refer"], shown["referReason"]) == ("true", "not_a_lesion")
    assert abs(float(shown["malignant"]) - expected["malignant"]) <= 1e-6
    from selenium.webdriver.common.by import By
    card = chromium.find_element(By.CSS_SELECTOR, "[data-testid=result]")
    assert "Refer to a dermatologist: this may not be a skin lesion" in card.text


def test_relay_never_carries_the_image_or_the_result_in_clear(chromium, stack, site, test_image_paths):
    image = test_image_paths[0]
    start = len(site.proxy.connections)
    assert open_page(chromium, site.url) == "verified"
    choose(chromium, [image])
    [shown] = results(chromium, 1)
    label = classify_json(stack, image)["label"]
    assert shown["code"] == "nv"
    captured = site.proxy.since(start)
    up = b"".join(f.body for c in captured for f in c["up"])
    down = b"".join(f.body for c in captured for f in c["down"])
    data = image.read_bytes()
    assert len(up) > len(data)  # the image went through, sealed
    carried = up + down
    assert data not in carried
    for offset in range(0, len(data) - 32, 509):  # not even 32 bytes of it anywhere
        assert data[offset:offset + 32] not in carried
    for text in (label, label.lower(), "Melanocytic"):
        assert text.encode() not in carried
    assert label not in site.proc.output and "Melanocytic" not in site.proc.output


def test_wrong_pcr0_shows_pcr_mismatch_and_sends_nothing(chromium, stack, test_image_paths, tmp_path):
    policy = json.loads((stack.tmp / "dev-policy.json").read_text())
    pcr0 = policy["allowed_pcrs"][0]["PCR0"]
    policy["allowed_pcrs"][0]["PCR0"] = ("0" if pcr0[0] != "0" else "1") + pcr0[1:]
    wrong = tmp_path / "wrong-pcr0.json"
    wrong.write_text(json.dumps(policy))
    site = Site(stack, wrong)
    try:
        assert open_page(chromium, site.url) == "failed"
        from selenium.webdriver.common.by import By
        assert chromium.find_element(By.ID, "attestation").get_attribute("data-check") == "PcrMismatch"
        choose(chromium, [test_image_paths[0]])  # the user tries anyway
        [shown] = results(chromium, 1)
        assert "code" not in shown and shown["error"] == "NOT_SENT"
        sent = [f.type for c in site.proxy.since(0) for f in c["up"]]
        assert sent and set(sent) == {MessageType.HELLO}  # nothing after the attestation
    finally:
        site.stop()


def test_host_swapping_the_attested_key_is_refused_and_nothing_is_sent(chromium, stack, rsa_key, test_image_paths):
    from nitrolesion.crypto.envelope import public_key_der

    site = Site(stack, stack.tmp / "dev-policy.json", swap_key=public_key_der(rsa_key(3072)))
    try:
        assert open_page(chromium, site.url) == "failed"
        from selenium.webdriver.common.by import By
        assert chromium.find_element(By.ID, "attestation").get_attribute("data-check") == "PublicKeyMismatch"
        choose(chromium, [test_image_paths[0]])
        [shown] = results(chromium, 1)
        assert shown["error"] == "NOT_SENT"
        captured = site.proxy.since(0)
        assert captured and all(f.type == MessageType.HELLO for c in captured for f in c["up"])
    finally:
        site.stop()


def test_batch_of_ten_with_a_non_image_and_the_csv_download(chromium, stack, site, test_image_paths, tmp_path):
    """10 images and a text file at once: 10 classified, the text file BAD_IMAGE; the CSV
    has classify --out's columns, provenance keys and values."""
    from nitrolesion.parent.classify import CSV_COLUMNS, read_results_csv

    batch = tmp_path / "batch"
    batch.mkdir()
    images = []
    for n in range(10):
        target = batch / f"image{n:02d}.jpg"
        shutil.copyfile(test_image_paths[n % len(test_image_paths)], target)
        images.append(target)
    note = batch / "notes.txt"
    note.write_text("not an image\n")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    chromium.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    assert open_page(chromium, site.url) == "verified"
    started = chromium.execute_script("return performance.now()")
    chosen = images[:4] + [note] + images[4:]  # the failing file in the middle of the batch
    choose(chromium, chosen)
    shown = results(chromium, 11)
    by_file = {r["file"]: r for r in shown}
    assert by_file["notes.txt"].get("error") == "BAD_IMAGE" and "code" not in by_file["notes.txt"]
    assert all("code" in by_file[p.name] and "error" not in by_file[p.name] for p in images)
    progress = chromium.execute_script("return [document.getElementById('progress').value, document.getElementById('progress').max]")
    assert progress == [11, 11]

    from selenium.webdriver.common.by import By
    chromium.find_element(By.ID, "download").click()
    deadline = time.monotonic() + WAIT
    while not (downloads / "results.csv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    provenance, rows = read_results_csv(downloads / "results.csv")

    out = tmp_path / "cli.csv"
    done = stack.parent_cli("classify", *map(str, chosen), "--out", str(out), "--port",
                            str(stack.client_port), "--policy", str(stack.tmp / "dev-policy.json"),
                            "--dev-root", str(stack.dev_root))
    assert done.returncode == 1, done.stderr  # the text file failed
    cli_provenance, cli_rows = read_results_csv(out)
    assert list(rows[0].keys()) == CSV_COLUMNS == list(cli_rows[0].keys())
    assert provenance.keys() == cli_provenance.keys()
    for key in ("notice", "enclave_pcr0", "enclave_pcr1", "enclave_pcr2", "pcrs_checked",
                "enclave_debug_mode", "attestation_root", "policy", "policy_sha256", "model_sha256_local"):
        assert provenance[key] == cli_provenance[key], key
    cli_by_file = {Path(r["file"]).name: r for r in cli_rows}
    assert [r["file"] for r in rows] == [Path(r["file"]).name for r in cli_rows]  # same order
    for row in rows:
        expected = cli_by_file[row["file"]]
        assert row["code"] == expected["code"] and row["label"] == expected["label"]
        for column in ["confidence", "malignant"] + [c for c in CSV_COLUMNS if c.startswith("p_")]:
            if expected[column]:
                assert abs(float(row[column]) - float(expected[column])) <= 1e-6, column
                if float(row[column]) == float(expected[column]):  # then written as Python does
                    assert row[column] == expected[column], column
        assert (row["refer"], row["refer_reason"]) == (expected["refer"], expected["refer_reason"])
        assert row["error"].split(":")[0] == expected["error"].split(":")[0]
    assert {row["refer"] for row in rows} == {"true", "false", ""}  # both answers and the failed file
    summary, cli_summary = json.loads(provenance["summary"]), json.loads(cli_provenance["summary"])
    assert summary.keys() == cli_summary.keys()
    for key in ("images", "classified", "failed", "failed_by_reason", "by_code", "referred"):
        assert summary[key] == cli_summary[key], key
    assert summary["referred"] == sum(row["refer"] == "true" for row in rows)

    if target := os.environ.get("NITROLESION_WEB_SCREENSHOT"):
        first = chromium.execute_script("return Number(document.body.dataset.firstResultMs)")
        print(f"\npage load -> attested {chromium.execute_script('return document.body.dataset.attestedMs')} ms; "
              f"images chosen at {started:.0f} ms, first result at {first} ms")
        chromium.execute_script("window.scrollTo(0, 0)")
        chromium.save_screenshot(target)


def test_a_saved_copy_served_from_the_clinics_machine_uses_the_relay(chromium, site, test_image_paths, tmp_path):
    """The mitigation docs/WEB.md gives for the host serving the page's code: save the page,
    check app.js's SHA-256, serve the copy on this machine and point it at the relay."""
    import hashlib
    import sys

    copy = tmp_path / "saved"
    shutil.copytree(ROOT / "web" / "dist", copy)
    assert hashlib.sha256((copy / "app.js").read_bytes()).hexdigest() in (ROOT / "README.md").read_text()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                              cwd=copy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        start = len(site.proxy.connections)
        assert open_page(chromium, f"http://127.0.0.1:{port}/index.html?relay={site.url}") == "verified"
        choose(chromium, [test_image_paths[0]])
        [shown] = results(chromium, 1)
        assert shown["code"] == "nv"
        assert site.proxy.since(start)  # through the relay named in ?relay=
    finally:
        server.terminate()
        server.wait(10)


def test_a_session_the_enclave_closed_while_idle_is_replaced(chromium, test_image_paths, tmp_path):
    """The enclave closes a silent session (--io-timeout); the next images attest anew."""
    idle = EnclaveStack(tmp_path, enclave_args=("--io-timeout", "1"), start_server=False)
    site = Site(idle, idle.tmp / "dev-policy.json")
    try:
        assert open_page(chromium, site.url) == "verified"
        deadline = time.monotonic() + WAIT
        while not any(c["down"] and c["down"][-1].type == MessageType.ERROR for c in site.proxy.since(0)):
            assert time.monotonic() < deadline, "the enclave never closed the idle session"
            time.sleep(0.1)
        choose(chromium, [test_image_paths[0]])
        [shown] = results(chromium, 1)
        assert shown["code"] == "nv"
        assert len(site.proxy.since(0)) == 2  # the closed session, then a new attested one
    finally:
        site.stop()
        idle.stop(wait=False)


def test_images_dropped_on_the_page_are_classified(chromium, site, test_image_paths):
    """Drag and drop: a drop event carrying a file (built in the page, as a browser builds
    one from a dragged file) is classified like a chosen one."""
    import base64

    image = test_image_paths[0]
    assert open_page(chromium, site.url) == "verified"
    chromium.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const dropped = new DataTransfer();
        dropped.items.add(new File([bytes], arguments[1], {type: "image/jpeg"}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: dropped, bubbles: true, cancelable: true}));
    """, base64.b64encode(image.read_bytes()).decode(), image.name)
    [shown] = results(chromium, 1)
    assert shown["file"] == image.name and shown["code"] == "nv"
