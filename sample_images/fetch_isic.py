"""Download a few public-domain (CC-0) dermatoscopic images from the ISIC Archive.

    python sample_images/fetch_isic.py [--count 3] [--out sample_images/]

Needs internet access (the development machines of this project have none, which is why
no image is committed here). Only images whose ``copyright_license`` is ``CC-0`` are kept,
whatever the search returned; each is saved as ``<isic_id>.jpg`` with a ``.json`` sidecar
holding its licence and attribution. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

API = "https://api.isic-archive.com/api/v2/images/search/"
#: Refuse anything larger: a full-resolution ISIC JPEG is a few MB.
MAX_DOWNLOAD = 30 * 1024 * 1024


def fetch(url: str, limit: int = MAX_DOWNLOAD) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - https only
        data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{url}: larger than {limit} bytes")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    query = urllib.parse.urlencode({"query": "copyright_license:CC-0", "limit": args.count * 4})
    try:
        listing = json.loads(fetch(f"{API}?{query}"))
    except (OSError, ValueError) as exc:
        print(f"fetch_isic: cannot reach the ISIC Archive ({exc}); pass --image PATH to the "
              "demo instead", file=sys.stderr)
        return 1
    saved = 0
    for item in listing.get("results", []):
        if saved >= args.count:
            break
        if item.get("copyright_license") != "CC-0":
            continue
        url = item.get("files", {}).get("full", {}).get("url")
        if not url or not url.startswith("https://"):
            continue
        target = args.out / f"{item['isic_id']}.jpg"
        data = fetch(url)
        tmp = target.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        meta = {"isic_id": item["isic_id"], "copyright_license": "CC-0",
                "attribution": item.get("attribution"), "source": url}
        target.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"saved {target} ({len(data)} bytes, CC-0, {meta['attribution']})")
        saved += 1
    if not saved:
        print("fetch_isic: no CC-0 image found in the answer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
