"""``parent.py classify``: many images over one attested session, results printed or saved.

Every results file carries its provenance (``provenance_of``): when, with which tool, which
enclave (the attested PCRs and module id), under which policy, and the local model file's
hash. Ctrl-C saves the rows already done (``Interrupted``); the progress bar is drawn only
on a terminal and only while images are being sent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from nitrolesion import __version__
from nitrolesion.crypto.envelope import fingerprint
from nitrolesion.errors import ImageFileError, UsageError
from nitrolesion.model.classifier import DEFAULT_MODEL_PATH
from nitrolesion.model.labels import CODES
from nitrolesion.parent import fleet as fleets
from nitrolesion.parent.enclave_client import EnclaveClient, ImageOutcome
from nitrolesion.parent.images import expand_images, read_image_file
from nitrolesion.parent.options import POLICY_FILE, key_dir_of, pcr_lines, transport_of
from nitrolesion.transport import endpoint_for
from nitrolesion.wire.messages import printable, triage_text

CSV_COLUMNS = (["file", "code", "label", "confidence"] + [f"p_{c}" for c in CODES]
               + ["malignant", "refer", "refer_reason", "error"])
NOTICE = "research demonstrator, not a medical device"
#: Error code of the rows a Ctrl-C left undone.
INTERRUPTED = "INTERRUPTED"
#: A provenance line of a CSV results file: ``# key: value``.
_CSV_COMMENT = re.compile(r"^# ([a-z0-9_]+): (.*)$")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a batch, raised once the rows done were saved; ``str()`` is the one
    line to print (parent.py's main prints it and exits 130)."""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_of_file(path: Path) -> str | None:
    """Hex SHA-256 of the file, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def read_or_error(path: Path, named: bool) -> bytes | ImageFileError:
    """The file's bytes, or the error to report for that row (the batch goes on).
    ``named``: the user gave this path itself, not a folder holding it."""
    try:
        return read_image_file(path, named=named)
    except ImageFileError as exc:
        return exc


def row_of(path: Path, outcome: ImageOutcome) -> dict:
    if outcome.result is None:
        code, message = outcome.error  # may come from the enclave: make it safe to print
        return {"file": str(path), "error": {"code": printable(code), "message": printable(message)}}
    result = outcome.result
    return {"file": str(path), "code": printable(result.code), "label": printable(result.name),
            "confidence": round(result.confidence, 6),
            "probabilities": {c: round(result.probabilities[c], 6) for c in CODES},
            "top3": [[c, round(p, 6)] for c, p in result.top(3)],
            "malignant": round(result.malignant, 6), "refer": result.refer,
            "refer_reason": result.refer_reason}


def interrupted_row(path: Path) -> dict:
    return {"file": str(path), "error": {"code": INTERRUPTED,
                                         "message": "not classified: the batch was interrupted"}}


def text_line(row: dict) -> str:
    name = Path(row["file"]).name
    if "error" in row:
        return f"{name}: error {row['error']['code']}: {row['error']['message']}"
    top = ", ".join(f"{c} {p:.2f}" for c, p in row["top3"])
    triage = triage_text(row["malignant"], row["refer"], row["refer_reason"])
    return f"{name}: {row['label']} ({row['code']}) {row['confidence']:.2f}  top-3: {top}  {triage}"


def summary_of(done: list[dict], seconds: float, total: int | None = None) -> dict:
    """The batch's summary from the rows ``done``; ``total`` (default: as many) counts the
    rows a Ctrl-C left undone too, and ``complete`` says whether there are any."""
    total = len(done) if total is None else total
    ok = [r for r in done if "error" not in r]
    failed = Counter(r["error"]["code"] for r in done if "error" in r)
    return {"images": total, "classified": len(ok), "failed": len(done) - len(ok),
            "failed_by_reason": dict(sorted(failed.items())),
            "interrupted": total - len(done), "complete": len(done) == total,
            "by_code": dict(sorted(Counter(r["code"] for r in ok).items())),
            "referred": sum(1 for r in ok if r["refer"]),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(done) / seconds, 2) if seconds > 0 else None}


def summary_text(summary: dict) -> str:
    """The summary as one line for people: images, classified, failed by reason, speed."""
    failed = f"{summary['failed']} failed"
    if summary["failed_by_reason"]:
        failed += " (" + ", ".join(f"{code} {count}" for code, count
                                   in summary["failed_by_reason"].items()) + ")"
    speed = summary["images_per_second"]
    parts = [f"{summary['images']} images", f"{summary['classified']} classified",
             f"{summary['referred']} referred", failed]
    if summary["interrupted"]:
        parts.append(f"{summary['interrupted']} not done (interrupted)")
    parts.append(f"{summary['seconds']:.1f} s" + (f", {speed:g} images/s" if speed else ""))
    return "summary: " + ", ".join(parts)


def print_summary(summary: dict, machine: bool) -> None:
    """On stderr: the JSON form with --json (for scripts), else the line for people."""
    text = f"summary: {json.dumps(summary)}" if machine else summary_text(summary)
    print(text, file=sys.stderr)


# -- provenance -------------------------------------------------------------------------
def policy_provenance(args) -> dict:
    """Which policy the trust came from, the way parent.py's load_policy chooses it."""
    if args.policy:
        path, how = Path(os.path.abspath(args.policy)), "--policy"
    else:
        path, how = Path(os.path.abspath(key_dir_of(args) / POLICY_FILE)), "installed policy"
        if not path.exists():  # only --insecure-any-enclave gets this far without one
            return {"policy": "none: --insecure-any-enclave, PCRs NOT checked",
                    "policy_sha256": None}
    return {"policy": f"{how} {path}", "policy_sha256": sha256_of_file(path)}


def attestation_provenance(result) -> dict:
    """What the verified attestation proves about the enclave that classified the images."""
    return {
        "enclave_module_id": printable(result.module_id),
        "enclave_attested_utc": result.timestamp.astimezone(timezone.utc).isoformat(
            timespec="seconds"),
        **{f"enclave_pcr{i}": result.pcrs[i].hex() for i in (0, 1, 2) if i in result.pcrs},
        "pcrs_checked": result.matched_pcr_set >= 0,
        "enclave_debug_mode": result.debug,
        "attestation_root": ("AWS Nitro Enclaves root" if result.root_is_aws else
                             "development root given with --dev-root (not a real enclave)"),
    }


def provenance_of(started_utc: str, policy: dict, attestation: dict,
                  model_path: Path = DEFAULT_MODEL_PATH) -> dict:
    """The provenance block of a results file.

    The enclave's model is inside its image, proven by the attested PCRs; this side only
    has its own copy of the shipped model file, so its hash is recorded as that, the local
    copy, never as the model the enclave ran.
    """
    return {
        "notice": NOTICE,
        "tool": "nitrolesion parent.py classify",
        "tool_version": __version__,
        "started_utc": started_utc,
        "finished_utc": utc_now(),
        "model_file_local": str(model_path),
        "model_sha256_local": sha256_of_file(model_path),
        "model_note": ("SHA-256 of this machine's copy of the shipped model file; the model "
                       "the enclave ran is part of its image, proven by the attested PCRs"),
        **attestation,
        **policy,
    }


# -- results files ----------------------------------------------------------------------
def check_output_path(path: Path) -> str | None:
    """Why results could not be written to ``path``, or None; checked before any work, so
    a typo in --out does not cost a whole batch."""
    folder = path.parent
    if not folder.is_dir():
        return f"--out {path}: folder {folder} does not exist"
    if path.is_dir():
        return f"--out {path} is a folder"
    if not os.access(folder, os.W_OK):
        return f"--out {path}: folder {folder} is not writable"
    return None


def _comment_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return printable(text)  # one line, whatever a path or the enclave put in it


def csv_comment_lines(provenance: dict, summary: dict) -> list[str]:
    """The ``#`` lines before a CSV file's header: provenance, completeness, summary."""
    lines = [f"# {NOTICE}",
             "# provenance of these results, one 'key: value' per line; CSV readers must skip "
             "lines starting with '#' (pandas: read_csv(path, comment='#'))"]
    fields = {**provenance, "complete": summary["complete"], "summary": summary}
    lines += [f"# {key}: {_comment_value(value)}" for key, value in fields.items()]
    return lines


def write_results(path: Path, rows: list[dict], summary: dict, provenance: dict) -> None:
    """CSV (provenance as ``#`` lines, then one row per image) or JSON (provenance, rows,
    summary), written atomically and readable by the owner only (0600: these are
    diagnoses in clear). On failure neither a partial file nor the temporary one is left."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_file() and not tmp.is_symlink():
        tmp.unlink()  # left by a crash; recreated below so its mode is ours, not its own
    # O_EXCL (which also refuses a symlink): never write through something planted there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "w", newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".json":
                handle.write(json.dumps({"provenance": provenance, "results": rows,
                                         "summary": summary}, indent=2) + "\n")
            else:
                for line in csv_comment_lines(provenance, summary):
                    handle.write(line + "\n")
                # Strings quoted: a '#' in a file name must not start a comment for readers
                # that skip comments (pandas' comment='#' honours quotes only).
                # A fleet's rows also say which enclave classified them.
                fleet_rows = any("enclave" in row for row in rows)
                writer = csv.DictWriter(handle, quoting=csv.QUOTE_NONNUMERIC, fieldnames=CSV_COLUMNS
                                        + (fleets.CSV_COLUMNS if fleet_rows else []))
                writer.writeheader()
                for row in rows:
                    flat = {"file": row["file"]}
                    if "error" in row:
                        flat["error"] = f"{row['error']['code']}: {row['error']['message']}"
                    else:
                        flat.update(code=row["code"], label=row["label"],
                                    confidence=row["confidence"],
                                    **{f"p_{c}": row["probabilities"][c] for c in CODES},
                                    malignant=row["malignant"],
                                    refer="true" if row["refer"] else "false",
                                    refer_reason=row["refer_reason"] or "")
                    if fleet_rows:
                        flat.update(fleets.csv_fields(row))
                    writer.writerow(flat)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours: O_EXCL created it
        raise


def read_results_csv(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """A CSV results file read back: its provenance (``# key: value`` lines, values as
    text) and its rows (csv.DictReader over the lines that are not comments)."""
    with open(path, newline="", encoding="utf-8") as handle:
        lines = handle.read().splitlines(keepends=True)
    provenance = {}
    for line in lines:
        if not line.startswith("#"):
            break
        if match := _CSV_COMMENT.match(line.rstrip("\r\n")):
            provenance[match.group(1)] = match.group(2)
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    return provenance, rows


# -- terminal ---------------------------------------------------------------------------
def open_progress(total: int, stream, enabled: bool = True):
    """A tqdm bar on ``stream``, or None: only on a terminal (in a log or a pipe its
    carriage returns are noise) and only for more than one image."""
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        terminal = False
    if not (enabled and terminal and total > 1):
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=stream)


def close_progress(progress, keep: bool) -> None:
    """Close the bar before any line of ours: ``keep`` leaves its last state on screen
    (a finished batch), otherwise it is erased (an error or Ctrl-C line follows)."""
    if progress is not None:
        if not keep:
            progress.leave = False
        progress.close()


@contextmanager
def sigint_ignored():
    """Ctrl-C is ignored inside: a second one must not lose the rows being written."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- the command ------------------------------------------------------------------------
class _Batch:
    """What run_classify knows so far, for the end of the batch or its interruption."""

    def __init__(self, args, paths: list[Path], policy: dict) -> None:
        self.args = args
        self.paths = paths
        self.policy = policy
        self.rows: list[dict | None] = [None] * len(paths)
        self.started_utc = utc_now()
        self.started = time.perf_counter()
        self.attestation: dict | None = None

    def provenance(self) -> dict:
        return provenance_of(self.started_utc, self.policy, self.attestation or {})

    def finish_interrupted(self) -> str:
        """Save the rows done (the rest marked INTERRUPTED) and say so in one line."""
        args = self.args
        done = [row for row in self.rows if row is not None]
        if not done:
            return "interrupted before any image was classified; nothing written"
        rows = [row if row is not None else interrupted_row(path)
                for path, row in zip(self.paths, self.rows)]
        summary = summary_of(done, time.perf_counter() - self.started, total=len(rows))
        head = f"interrupted: {summary['classified']} of {len(rows)} images classified"
        if summary["failed"]:
            head += f" ({summary['failed']} failed)"
        if not args.out:
            if args.json:
                print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
            else:
                for row in done:
                    print(text_line(row))
            return f"{head}; the rows done are above on stdout"
        try:
            write_results(args.out, rows, summary, self.provenance())
        except OSError as exc:
            print(json.dumps(done, indent=2))
            return (f"{head}; could not write {args.out}: {exc.strerror or exc}; the "
                    f"{len(done)} rows done are on stdout as JSON")
        return (f"{head}; wrote {args.out} (incomplete: {summary['interrupted']} rows "
                f"marked {INTERRUPTED})")


def run_fleet_batch(fleet: "fleets.Fleet", batch: _Batch, named: set, progress) -> None:
    """The batch over a fleet of enclaves: each row also names the enclave (endpoint,
    module id, PCRs) that classified it; attestations, refusals and failures are told on
    stderr as they happen."""
    paths = batch.paths
    say = progress.write if progress is not None else (lambda line: print(line, file=sys.stderr))
    for event in fleet.classify(len(paths), lambda i: read_or_error(paths[i], named=paths[i] in named)):
        if event.outcome is None:
            say(fleets.event_line(event))
            batch.attestation = fleet.provenance(attestation_provenance)
            continue
        row = row_of(paths[event.outcome.index], event.outcome)
        if event.member is not None:
            row["enclave"] = event.member.row_tag()
        batch.rows[event.outcome.index] = row
        if progress is not None:
            progress.update(1)


def run_classify(args, make_trust) -> int:
    """``make_trust()`` is called once the arguments are known to be usable, so a typo is
    a usage error (exit 2) even where no policy is configured yet."""
    # lexists: a dangling symlink exists (it becomes an UNREADABLE row); a typo does not.
    missing = [str(p) for p in args.images if not os.path.lexists(p)]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(map(printable, missing))}")
    paths = expand_images(args.images)
    if not paths:
        raise UsageError("no image files found in the given paths")
    if args.out and args.out.suffix.lower() not in (".csv", ".json"):
        raise UsageError("--out must end in .csv or .json")
    if args.window < 1:
        raise UsageError("--window must be at least 1")
    if args.out and (problem := check_output_path(args.out)):
        raise UsageError(problem)
    enclaves = fleets.endpoints_of(args)  # --enclave/--enclaves-file; [] for --cid/--port
    trust = make_trust()
    batch = _Batch(args, paths, policy_provenance(args))
    endpoint = endpoint_for(transport_of(args), args.cid, args.port, args.host)
    fleet = fleets.Fleet(enclaves, trust, timeout=args.timeout, window=args.window) if enclaves else None
    progress = None
    try:
        if fleet is not None:
            progress = open_progress(len(paths), sys.stderr, enabled=not args.no_progress)
            run_fleet_batch(fleet, batch, set(args.images), progress)
        else:
            with EnclaveClient(endpoint, trust, timeout=args.timeout) as client:
                result = client.attest()
                batch.attestation = attestation_provenance(result)
                print(f"Enclave attested: module {result.module_id}, key sha256 "
                      f"{fingerprint(result.public_key)[:16]}...", file=sys.stderr)
                for line in pcr_lines(result):
                    print(line, file=sys.stderr)
                client.open_session()
                sys.stderr.flush()  # our lines first, then the bar (same stream)
                progress = open_progress(len(paths), sys.stderr, enabled=not args.no_progress)
                named = set(args.images)
                images = (read_or_error(p, named=p in named) for p in paths)
                for outcome in client.classify_many(images, window=args.window):
                    batch.rows[outcome.index] = row_of(paths[outcome.index], outcome)
                    if progress is not None:
                        progress.update(1)
    except KeyboardInterrupt:
        with sigint_ignored():  # a second Ctrl-C must not lose the rows being saved
            close_progress(progress, keep=False)
            raise Interrupted(batch.finish_interrupted()) from None
    except BaseException:
        close_progress(progress, keep=False)  # main's error line gets a line of its own
        raise
    finally:
        if fleet is not None:
            fleet.close()
    close_progress(progress, keep=True)
    rows = batch.rows
    summary = summary_of(rows, time.perf_counter() - batch.started)
    if fleet is not None:
        summary["fleet"] = fleet.report()
    if args.out:
        try:
            with sigint_ignored():  # the batch is done: Ctrl-C now must not lose it
                write_results(args.out, rows, summary, batch.provenance())
        except OSError as exc:
            # The batch is done: rather than lose it, give every row on stdout.
            print(f"could not write {args.out}: {exc.strerror or exc}; all {len(rows)} rows "
                  "follow on stdout as JSON", file=sys.stderr)
            print(json.dumps(rows, indent=2))
            print_summary(summary, args.json)
            return 1
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    elif not args.out or len(rows) <= 20:
        for row in rows:
            print(text_line(row))
    print_summary(summary, args.json)
    if fleet is not None and not args.json:
        for line in fleets.summary_lines(summary["fleet"]):
            print(line, file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1
