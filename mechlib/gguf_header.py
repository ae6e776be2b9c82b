"""The two numbers the runner needs from a GGUF file — layer count and width — read from its header.

Why not ``gguf.GGUFReader``: it parses every key, including the ~100 k tokenizer strings, which
takes 3–9 s on 2 cores; the two numbers sit near the start of the header, so this scan stops
there (a few ms). :func:`mechlib.models.gguf_shape` turns its errors into a message for the reader.
"""

from __future__ import annotations

import os
import struct
from typing import IO

# GGUF value types (gguf.GGUFValueType) → byte size of one value; 8 = string, 9 = array.
GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def scan_gguf(fh: IO[bytes], size: int) -> tuple[int, int]:
    """``(<arch>.block_count, <arch>.embedding_length)``; raises ValueError or struct.error on a bad header."""

    def read(fmt: str) -> int:  # every format read here is an integer
        return int(struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0])

    def string() -> bytes:
        n = read("<Q")
        if n > size:
            raise ValueError(f"string length {n} past the end of the file")
        return fh.read(n)

    def skip(vtype: int) -> None:
        if vtype == 8:
            fh.seek(read("<Q"), os.SEEK_CUR)
        elif vtype == 9:
            inner, count = read("<I"), read("<Q")
            if inner in GGUF_SIZES:
                fh.seek(GGUF_SIZES[inner] * count, os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(inner)
        elif vtype in GGUF_SIZES:
            fh.seek(GGUF_SIZES[vtype], os.SEEK_CUR)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    if fh.read(4) != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    version = read("<I")
    read("<I" if version == 1 else "<Q")  # tensor count
    n_kv = read("<I" if version == 1 else "<Q")
    arch, found = None, {}
    for _ in range(n_kv):
        key = string().decode("utf-8")
        vtype = read("<I")
        if key == "general.architecture" and vtype == 8:
            arch = string().decode("utf-8")
        elif key.endswith((".block_count", ".embedding_length")) and vtype in GGUF_INTS:
            found[key] = read(GGUF_INTS[vtype])
        else:
            skip(vtype)
        if arch and f"{arch}.block_count" in found and f"{arch}.embedding_length" in found:
            return int(found[f"{arch}.block_count"]), int(found[f"{arch}.embedding_length"])
    raise ValueError(f"no {arch or '<arch>'}.block_count / .embedding_length in the header")
