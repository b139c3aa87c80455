"""MongoDB wire protocol framing for the fake replica set (OP_MSG, OP_QUERY).

Only what a modern driver sends is understood: ``OP_MSG`` for every command
after the handshake, and the legacy ``OP_QUERY`` that pymongo uses for the
first ``hello`` on each connection. Compression is never advertised, so
``OP_COMPRESSED`` never arrives.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import bson
from bson.codec_options import CodecOptions

__all__ = ["Request", "encode_reply", "read_request"]

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013

_HEADER = struct.Struct("<iiii")
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")
_CHECKSUM_PRESENT = 1
_MORE_TO_COME = 1 << 1

#: Commands keep the key order of the request: the first key is the command name.
CODEC = CodecOptions(document_class=dict, tz_aware=False)


class Request:
    """One decoded client message."""

    __slots__ = ("body", "more_to_come", "opcode", "request_id")

    def __init__(self, request_id: int, opcode: int, body: dict[str, Any], more_to_come: bool) -> None:
        self.request_id = request_id
        self.opcode = opcode
        self.body = body
        self.more_to_come = more_to_come


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def read_request(sock: socket.socket) -> Request | None:
    """Read one message; ``None`` when the peer closed the connection."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    length, request_id, _response_to, opcode = _HEADER.unpack(header)
    payload = _recv_exactly(sock, length - _HEADER.size)
    if payload is None:
        return None
    if opcode == OP_MSG:
        return _parse_op_msg(request_id, payload)
    if opcode == OP_QUERY:
        return _parse_op_query(request_id, payload)
    raise ValueError(f"unsupported opcode {opcode}")


def _parse_op_msg(request_id: int, payload: bytes) -> Request:
    (flags,) = _UINT32.unpack_from(payload, 0)
    end = len(payload) - (4 if flags & _CHECKSUM_PRESENT else 0)
    pos = 4
    body: dict[str, Any] = {}
    sequences: dict[str, list[dict[str, Any]]] = {}
    while pos < end:
        kind = payload[pos]
        pos += 1
        if kind == 0:
            (size,) = _INT32.unpack_from(payload, pos)
            body = bson.decode(payload[pos : pos + size], codec_options=CODEC)
            pos += size
        elif kind == 1:
            (size,) = _INT32.unpack_from(payload, pos)
            section_end = pos + size
            pos += 4
            name_end = payload.index(b"\x00", pos)
            identifier = payload[pos:name_end].decode()
            pos = name_end + 1
            docs = []
            while pos < section_end:
                (doc_size,) = _INT32.unpack_from(payload, pos)
                docs.append(bson.decode(payload[pos : pos + doc_size], codec_options=CODEC))
                pos += doc_size
            sequences[identifier] = docs
        else:
            raise ValueError(f"unknown OP_MSG section kind {kind}")
    body.update(sequences)
    return Request(request_id, OP_MSG, body, bool(flags & _MORE_TO_COME))


def _parse_op_query(request_id: int, payload: bytes) -> Request:
    pos = 4  # flags
    name_end = payload.index(b"\x00", pos)
    collection = payload[pos:name_end].decode()
    pos = name_end + 1 + 8  # numberToSkip, numberToReturn
    (size,) = _INT32.unpack_from(payload, pos)
    body = bson.decode(payload[pos : pos + size], codec_options=CODEC)
    if "$query" in body:
        body = body["$query"]
    body.setdefault("$db", collection.split(".", 1)[0])
    return Request(request_id, OP_QUERY, body, False)


_REQUEST_IDS = iter(range(1, 2**31 - 1))


def encode_reply(request: Request, doc: dict[str, Any]) -> bytes:
    """Encode ``doc`` as the reply to ``request`` in the opcode it used."""
    data = bson.encode(doc)
    if request.opcode == OP_QUERY:
        body = struct.pack("<iqii", 0, 0, 0, 1) + data
        opcode = OP_REPLY
    else:
        body = _UINT32.pack(0) + b"\x00" + data
        opcode = OP_MSG
    header = _HEADER.pack(_HEADER.size + len(body), next(_REQUEST_IDS), request.request_id, opcode)
    return header + body
