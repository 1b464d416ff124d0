"""The bytes of one tier entry: a header that says what the block is, then its tensors' raw bytes.

A tier is shared (other processes, other machines, a disk that outlives the process), so an entry
must prove it belongs to the reader before a single byte reaches the KV pool:

* a **magic and version**, so a foreign or older value is recognised;
* the **fingerprint** of the model, dtype, policy and page layout that wrote it (also in the key; the
  header catches a key collision or a hand-copied value);
* a **BLAKE2b checksum** over the tensor table and the payload, and the payload's length, so a truncated
  or corrupted value is rejected instead of loaded.

Tensors travel as they sit in the pool (model-dtype pages, or a quantizer's packed codes and fp16
scales): a quantized block costs the network its packed size, not the model dtype's.
"""
from __future__ import annotations

import hashlib
import json
import struct

import torch
from torch import Tensor

MAGIC = b"KVSLIM01"
_HEAD = struct.Struct("<8s16sQI32s")  # magic, fingerprint, payload bytes, table bytes, checksum
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int16, torch.int32,
    torch.float8_e4m3fn)}


class CorruptEntry(ValueError):
    """A tier value that is not a whole, intact entry written for this fingerprint."""


def _checksum(table: bytes, payload: bytes) -> bytes:
    digest = hashlib.blake2b(table, digest_size=32)
    digest.update(payload)
    return digest.digest()


def encode(fingerprint: bytes, tensors: list[Tensor]) -> bytes:
    """One entry holding ``tensors`` (any device; copied to host bytes as they are)."""
    if len(fingerprint) != 16:
        raise ValueError(f"a fingerprint is 16 bytes, not {len(fingerprint)}")
    table, chunks = [], []
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"tier entries hold {', '.join(_DTYPES)} tensors, not {t.dtype}")
        table.append([name, list(t.shape)])
        chunks.append(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    table_bytes = json.dumps(table, separators=(",", ":")).encode()
    payload = b"".join(chunks)
    head = _HEAD.pack(MAGIC, fingerprint, len(payload), len(table_bytes), _checksum(table_bytes, payload))
    return head + table_bytes + payload


def decode(fingerprint: bytes, data: bytes) -> list[Tensor]:
    """The tensors of an entry (on the host), or :class:`CorruptEntry` naming what is wrong with it."""
    if len(data) < _HEAD.size:
        raise CorruptEntry(f"entry of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, owner, payload_len, table_len, checksum = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry(f"entry starts with {magic!r}, not kvslim's {MAGIC!r}")
    if owner != fingerprint:
        raise CorruptEntry("entry was written for another model, dtype, policy or page layout")
    if len(data) != _HEAD.size + table_len + payload_len:
        raise CorruptEntry(f"entry holds {len(data)} bytes, its header promises {_HEAD.size + table_len + payload_len}")
    table_bytes = data[_HEAD.size:_HEAD.size + table_len]
    payload = data[_HEAD.size + table_len:]
    if _checksum(table_bytes, payload) != checksum:
        raise CorruptEntry("entry checksum does not match its contents")
    tensors, offset = [], 0
    for name, shape in json.loads(table_bytes):
        dtype = _DTYPES[name]
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        raw = torch.frombuffer(bytearray(payload[offset:offset + size]), dtype=torch.uint8)
        tensors.append(raw.view(dtype).view(shape))
        offset += size
    return tensors
