#!/usr/bin/env python3
"""Reads a TensorBoard event file independently of the C++ writer, and prints what it holds.

Usage: read_tfevents.py EVENT_FILE  (PYTHONPATH must hold tensorboard_event_pb2, which the build
generates from proto/tensorboard_event.proto with protoc --python_out).

The record framing and both CRCs are checked here with a bit-by-bit CRC-32C (the C++ side uses a
table), and the Events are decoded by Python's protobuf runtime. One line per item:

  version <file_version>
  scalar <tag> <step> <value>
  text <tag> <step> <text as a JSON string>

Exits with status 1 and a message on the first framing, CRC or decoding error.
"""

import json
import struct
import sys

import tensorboard_event_pb2


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(blob: bytes):
    pos = 0
    index = 0
    while pos < len(blob):
        if len(blob) - pos < 12:
            raise ValueError(f"record {index}: truncated header at byte {pos}")
        length_bytes = blob[pos : pos + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", blob[pos + 8 : pos + 12])
        if length_crc != masked(length_bytes):
            raise ValueError(f"record {index}: bad length CRC")
        start = pos + 12
        end = start + length
        if end + 4 > len(blob):
            raise ValueError(f"record {index}: truncated data")
        data = blob[start:end]
        (data_crc,) = struct.unpack("<I", blob[end : end + 4])
        if data_crc != masked(data):
            raise ValueError(f"record {index}: bad data CRC")
        yield data
        pos = end + 4
        index += 1


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], "rb") as f:
        blob = f.read()
    try:
        for data in records(blob):
            event = tensorboard_event_pb2.Event()
            event.ParseFromString(data)
            kind = event.WhichOneof("what")
            if kind == "file_version":
                print(f"version {event.file_version}")
            elif kind == "summary":
                for value in event.summary.value:
                    which = value.WhichOneof("value")
                    if which == "simple_value":
                        print(f"scalar {value.tag} {event.step} {value.simple_value!r}")
                    elif (
                        which == "tensor"
                        and value.metadata.plugin_data.plugin_name == "text"
                        and value.tensor.dtype == tensorboard_event_pb2.DT_STRING
                    ):
                        texts = [s.decode("utf-8") for s in value.tensor.string_val]
                        print(f"text {value.tag} {event.step} {json.dumps(''.join(texts))}")
                    else:
                        raise ValueError(f"unexpected summary value for tag {value.tag}")
            else:
                raise ValueError(f"unexpected event kind {kind}")
    except Exception as error:  # noqa: BLE001 - any failure is a failed check
        print(f"read_tfevents: {sys.argv[1]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
