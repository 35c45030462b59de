"""Verify an audit-log export: ``python -m shared.audit.verify EXPORT [--expect-sha256 HEX]``.

Standard library only, so a customer can copy this one file and run it anywhere.

The export is hashed with SHA-256 as it is written, every byte of every line. Each checkpoint
line (after each full page) and the final trailer line carry the hash of every byte before them.
This command recomputes the hash line by line and checks every checkpoint and the trailer:

- a changed, added or removed byte anywhere makes the next checkpoint (and the trailer) fail,
  which locates the damage to one page;
- a cut file has no trailer: reported as truncated, with the rows up to the last good checkpoint;
- ``--expect-sha256`` compares the trailer's hash with the one recorded in the organization's
  audit log (event ``audit_log.exported``, ``details.sha256``), which also catches a file whose
  hashes were recomputed after an edit.

Exit status 0 when the file verifies, 1 when it does not, 2 when it cannot be read.
The trailer's hash alone can also be checked with coreutils: ``head -n -1 EXPORT | sha256sum``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import BinaryIO

_CSV_SEAL = re.compile(rb"^#(checkpoint|trailer),rows=(\d+),sha256=([0-9a-f]{64})\n?$")


@dataclass
class Result:
    ok: bool
    message: str
    rows: int = 0
    sha256: str | None = None


def _seal(line: bytes, fmt: str, in_quotes: bool) -> tuple[str, int, str] | None:
    """(kind, rows, sha256) when ``line`` is a checkpoint or the trailer."""
    if fmt == "csv":
        match = _CSV_SEAL.match(line) if not in_quotes else None
        return (match[1].decode(), int(match[2]), match[3].decode()) if match else None
    if not line.startswith(b'{"record":"checkpoint"') and not line.startswith(b'{"record":"trailer"'):
        return None
    value = json.loads(line)
    return value["record"], int(value["rows"]), str(value["sha256"])


def verify(stream: BinaryIO) -> Result:
    first = stream.readline()
    if first.startswith(b'{"record":"header"'):
        fmt = "ndjson"
    elif first.startswith(b"#hiredhands-audit-export/"):
        fmt = "csv"
    else:
        return Result(False, "not an audit-log export: the first line is not an export header")
    hasher = hashlib.sha256(first)
    rows = 0  # event rows seen
    good_rows = 0  # rows up to the last checkpoint that verified
    in_quotes = False  # CSV: inside a quoted field that spans lines
    if fmt == "csv":
        columns = stream.readline()
        hasher.update(columns)
    for line in stream:
        seal = _seal(line, fmt, in_quotes)
        if seal is None:
            if not line.endswith(b"\n"):
                return Result(False, f"truncated: the last line is cut off; intact through row {good_rows}", good_rows)
            hasher.update(line)
            if fmt == "csv":
                starts_record = not in_quotes
                in_quotes ^= line.count(b'"') % 2 == 1
                rows += starts_record
            else:
                rows += 1
            continue
        kind, sealed_rows, sealed_hash = seal
        if sealed_hash != hasher.hexdigest():
            return Result(
                False,
                f"modified: the {kind} after row {sealed_rows} does not match the content before it;"
                f" intact through row {good_rows}",
                good_rows,
            )
        if sealed_rows != rows:
            return Result(False, f"modified: the {kind} counts {sealed_rows} rows but {rows} precede it", good_rows)
        good_rows = rows
        if kind == "trailer":
            if stream.read(1):
                return Result(False, "modified: data follows the trailer", rows)
            return Result(True, f"ok: {rows} rows, sha256 {sealed_hash}", rows, sealed_hash)
        hasher.update(line)
    return Result(False, f"truncated: no trailer; intact through row {good_rows} (the last good checkpoint)", good_rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Verify a HiredHands audit-log export.")
    parser.add_argument("export", help="the exported .ndjson or .csv file")
    parser.add_argument("--expect-sha256", help="the sha256 of the audit_log.exported event for this export")
    args = parser.parse_args(argv)
    try:
        with open(args.export, "rb") as stream:
            result = verify(stream)
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.export}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if result.ok and args.expect_sha256 and result.sha256 != args.expect_sha256.lower():
        result = Result(False, "modified: the file verifies on its own, but its sha256 is not the one in the audit log")
    print(result.message)  # noqa: T201
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
