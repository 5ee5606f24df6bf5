#!/usr/bin/env python3
"""Writes tests/Training.Tests/Goldens/numpy_golden.safetensors with numpy only.

An implementation of the safetensors layout independent of the C# writer, so a test can pin the
C# reader and writer to it. Rules followed (those of the reference Rust library):
  * 8-byte little-endian header length, then compact JSON ("__metadata__" first), padded with
    spaces to a multiple of 8;
  * tensors ordered by descending dtype alignment rank, then by name, packed without gaps.
Run from the repository root (any python3 with numpy, e.g. /usr/bin/python3 here):
    python3 tests/reference/make_safetensors_golden.py
"""
import json
import struct
from pathlib import Path

import numpy as np

# Position in the reference library's dtype enum (ordered by alignment).
RANK = {"BOOL": 0, "U8": 1, "I8": 2, "I16": 5, "F16": 7, "BF16": 8, "I32": 9, "F32": 11, "F64": 12, "I64": 13}


def bf16_bits(values):
    """BF16 is the top half of float32; the values below are exact in BF16, so truncation is exact."""
    bits = np.asarray(values, dtype="<f4").view("<u4") >> 16
    return bits.astype("<u2")


# name -> (dtype, shape, little-endian bytes)
TENSORS = {
    "embed.weight": ("F32", [2, 3], (np.arange(6, dtype="<f4") * 0.5 - 1).tobytes()),
    "double": ("F64", [2], np.array([3.141592653589793, -2.5e-300], dtype="<f8").tobytes()),
    "steps": ("I64", [], np.array(1234567890123, dtype="<i8").tobytes()),
    "ids": ("I32", [3], np.array([-1, 0, 2147483647], dtype="<i4").tobytes()),
    "short": ("I16", [2], np.array([-32768, 123], dtype="<i2").tobytes()),
    "tiny": ("I8", [3], np.array([-128, 0, 127], dtype="i1").tobytes()),
    "bytes": ("U8", [4], np.array([0, 1, 128, 255], dtype="u1").tobytes()),
    "mask": ("BOOL", [2, 2], np.array([[True, False], [False, True]], dtype="?").tobytes()),
    "half": ("F16", [3], np.array([1.0, -2.0, 65504.0], dtype="<f2").tobytes()),
    "brain": ("BF16", [2, 2], bf16_bits([1.0, -1.5, 0.15625, 256.0]).tobytes()),
    "empty": ("F32", [0, 3], b""),
}
METADATA = {"format": "pt", "source": "numpy"}


def main():
    order = sorted(TENSORS, key=lambda n: (-RANK[TENSORS[n][0]], n))
    header = {"__metadata__": dict(sorted(METADATA.items()))}
    offset = 0
    for name in order:
        dtype, shape, data = TENSORS[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    out = Path(__file__).resolve().parents[1] / "Training.Tests" / "Goldens" / "numpy_golden.safetensors"
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(TENSORS[name][2])
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
