"""``parent.py classify``: many images over one attested session, results printed or saved."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from nitrolesion.crypto.envelope import fingerprint
from nitrolesion.model.labels import CODES
from nitrolesion.transport import Endpoint
from nitrolesion.wire.messages import printable
from parent.enclave_client import EnclaveClient, ImageOutcome
from parent.images import ImageFileError, expand_images, read_image_file

CSV_COLUMNS = ["file", "code", "label", "confidence"] + [f"p_{c}" for c in CODES] + ["error"]


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
    top3 = sorted(result["probabilities"].items(), key=lambda item: -item[1])[:3]
    return {"file": str(path), "code": printable(result["code"]), "label": printable(result["name"]),
            "confidence": round(result["confidence"], 6),
            "probabilities": {c: round(result["probabilities"][c], 6) for c in CODES},
            "top3": [[c, round(p, 6)] for c, p in top3]}


def text_line(row: dict) -> str:
    name = Path(row["file"]).name
    if "error" in row:
        return f"{name}: error {row['error']['code']}: {row['error']['message']}"
    top = ", ".join(f"{c} {p:.2f}" for c, p in row["top3"])
    return f"{name}: {row['label']} ({row['code']}) {row['confidence']:.2f}  top-3: {top}"


def summary_of(rows: list[dict], seconds: float) -> dict:
    ok = [r for r in rows if "error" not in r]
    return {"images": len(rows), "classified": len(ok), "failed": len(rows) - len(ok),
            "by_code": dict(sorted(Counter(r["code"] for r in ok).items())),
            "seconds": round(seconds, 3),
            "images_per_second": round(len(rows) / seconds, 2) if seconds > 0 else None}


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


def write_results(path: Path, rows: list[dict], summary: dict) -> None:
    """CSV (one row per image) or JSON (rows + summary), written atomically and readable
    by the owner only (0600: these are diagnoses in clear). On failure neither a partial
    file nor the temporary one is left behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_file() and not tmp.is_symlink():
        tmp.unlink()  # left by a crash; recreated below so its mode is ours, not its own
    # O_EXCL (which also refuses a symlink): never write through something planted there.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "w", newline="", encoding="utf-8") as handle:
            if path.suffix.lower() == ".json":
                handle.write(json.dumps({"results": rows, "summary": summary}, indent=2) + "\n")
            else:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                for row in rows:
                    flat = {"file": row["file"]}
                    if "error" in row:
                        flat["error"] = f"{row['error']['code']}: {row['error']['message']}"
                    else:
                        flat.update(code=row["code"], label=row["label"],
                                    confidence=row["confidence"],
                                    **{f"p_{c}": row["probabilities"][c] for c in CODES})
                    writer.writerow(flat)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # ours: O_EXCL created it
        raise


def run_classify(args, make_trust) -> int:
    """``make_trust()`` is called once the arguments are known to be usable, so a typo is
    a usage error (exit 2) even where no policy is configured yet."""
    from parent.parent import UsageError, key_dir_of, pcr_lines, transport_of  # noqa: F401

    paths = expand_images(args.images)
    if not paths:
        raise UsageError("no image files found in the given paths")
    if args.out and args.out.suffix.lower() not in (".csv", ".json"):
        raise UsageError("--out must end in .csv or .json")
    if args.window < 1:
        raise UsageError("--window must be at least 1")
    if args.out and (problem := check_output_path(args.out)):
        raise UsageError(problem)
    trust = make_trust()
    endpoint = Endpoint(transport_of(args), args.cid, args.port, args.host)
    rows: list[dict | None] = [None] * len(paths)
    started = time.perf_counter()
    progress = None
    if len(paths) > 1 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(paths), unit="img", file=sys.stderr)
    with EnclaveClient(endpoint, trust, timeout=args.timeout) as client:
        result = client.attest()
        print(f"Enclave attested: module {result.module_id}, key sha256 "
              f"{fingerprint(result.public_key)[:16]}...", file=sys.stderr)
        for line in pcr_lines(result):
            print(line, file=sys.stderr)
        client.open_session()
        named = set(args.images)
        images = (read_or_error(p, named=p in named) for p in paths)
        for outcome in client.classify_many(images, window=args.window):
            rows[outcome.index] = row_of(paths[outcome.index], outcome)
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    summary = summary_of(rows, time.perf_counter() - started)
    if args.out:
        try:
            write_results(args.out, rows, summary)
        except OSError as exc:
            # The batch is done: rather than lose it, give every row on stdout.
            print(f"could not write {args.out}: {exc.strerror or exc}; all {len(rows)} rows "
                  "follow on stdout as JSON", file=sys.stderr)
            print(json.dumps(rows, indent=2))
            print(f"summary: {json.dumps(summary)}", file=sys.stderr)
            return 1
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    elif not args.out or len(rows) <= 20:
        for row in rows:
            print(text_line(row))
    print(f"summary: {json.dumps(summary)}", file=sys.stderr)
    return 0 if summary["failed"] == 0 else 1
