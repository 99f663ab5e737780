"""Read the records of an offline W&B run file (``run-*.wandb``).

wandb >= 0.19 no longer ships a Python reader; the file is a LevelDB-style log: a 7-byte
header (``:W&B``, magic, version), then 32 KiB blocks of chunks ``crc32 (4) | length (2)
| type (1) | data`` (type 1 full, 2 first, 3 middle, 4 last), each record a protobuf
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_HEADER, _BLOCK, _CHUNK_HEADER = 7, 32768, 7


def read_records(path: Path) -> list:
    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pending, pos = [], b"", _HEADER
    while pos + _CHUNK_HEADER <= len(raw):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + _CHUNK_HEADER])
        data = raw[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind == 0 and length == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history_rows(path: Path) -> list[dict]:
    """The logged metric rows, ``{key: value}`` each."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def config_keys(path: Path) -> set[str]:
    keys = set()
    for record in read_records(path):
        if record.WhichOneof("record_type") == "config":
            keys |= {item.key for item in record.config.update}
    return keys


def run_info(path: Path) -> dict:
    """The run's display name, group, job type and tags (the first run record)."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"name": run.display_name, "group": run.run_group,
                    "job_type": run.job_type, "tags": list(run.tags)}
    raise AssertionError(f"{path}: no run record")


def config_values(path: Path) -> dict:
    """The run's config as logged: top-level key -> value."""
    values = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "config":
            values.update({item.key: json.loads(item.value_json)
                           for item in record.config.update})
    return values


def summary_values(path: Path) -> dict:
    """The run's summary (the values a runs table shows): key -> last value."""
    values = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            values.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.summary.update})
    return values
