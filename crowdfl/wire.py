"""Compact, versioned, canonical binary encoding of message dataclasses.

No pickle: every field is written by its type annotation, in declaration order.

    message  := MAGIC(2) VERSION(u8) KIND(u8) body
    int      := i64 little-endian          float := f64 little-endian    bool := u8 (0 or 1)
    str      := u32 length + UTF-8         bytes := u32 length + raw
    ndarray  := dtype code(u8) ndim(u8) dims(u32 * ndim) raw little-endian C-order bytes
    tuple[T, ...] := u32 count + items

Decoding is strict: every length is checked against the remaining input and the limits below,
a bool must be 0 or 1, text must be valid UTF-8, the dtype must be on the allow-list and nothing
may follow the last field. Any violation raises :class:`WireError` with a reason; a decoder never
returns a partial message. Encoding a value and decoding it again yields an equal value, and
there is exactly one byte string per value (canonical), so hashes of encodings are stable.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from .errors import WireError

MAGIC = b"CF"
WIRE_VERSION = 1

# dtype code <-> numpy dtype (little-endian only: the canonical form)
_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("i1"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("u1"),
    7: np.dtype("<u8"),
}
_DTYPE_CODES: dict[np.dtype[Any], int] = {dt: code for code, dt in _DTYPES.items()}


@dataclass(frozen=True)
class Limits:
    """Upper bounds a decoder enforces before allocating anything."""

    max_message_bytes: int = 32 * 1024 * 1024
    max_array_elements: int = 8 * 1024 * 1024
    max_ndim: int = 4
    max_items: int = 65536
    max_text_bytes: int = 64 * 1024


DEFAULT_LIMITS = Limits()


class Message(Protocol):
    """A wire message: a dataclass with a unique ``KIND`` code."""

    KIND: ClassVar[int]


M = TypeVar("M")


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def raw(self, b: bytes) -> None:
        self.parts.append(b)

    def u32(self, n: int) -> None:
        self.parts.append(struct.pack("<I", n))


# the fixed-size fields, compiled once (struct.unpack would parse the format on every call)
_STRUCTS: dict[str, struct.Struct] = {fmt: struct.Struct(fmt) for fmt in ("<B", "<BB", "<I", "<q", "<d")}
_DIMS = tuple(struct.Struct(f"<{k}I") for k in range(DEFAULT_LIMITS.max_ndim + 1))


class _Reader:
    def __init__(self, data: bytes | memoryview, limits: Limits) -> None:
        self.view = memoryview(data)
        self.pos = 0
        self.limits = limits

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.view):
            raise WireError("truncated", f"{what}: need {n} bytes at offset {self.pos}, have {len(self.view) - self.pos}")
        out = self.view[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str, both: bool = False) -> Any:
        s = _STRUCTS.get(fmt) or struct.Struct(fmt)
        end = self.pos + s.size
        if end > len(self.view):
            raise WireError("truncated", f"{what}: need {s.size} bytes at offset {self.pos}, have {len(self.view) - self.pos}")
        values = s.unpack_from(self.view, self.pos)
        self.pos = end
        return values if both else values[0]

    def count(self, what: str, limit: int) -> int:
        n = int(self.unpack("<I", what))
        if n > limit:
            raise WireError("oversized", f"{what}: {n} exceeds limit {limit}")
        return n


def _encode_array(w: _Writer, a: np.ndarray, name: str) -> None:
    if not isinstance(a, np.ndarray):
        raise WireError("malformed", f"{name}: expected ndarray, got {type(a).__name__}")
    dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    code = _DTYPE_CODES.get(np.dtype(dt))
    if code is None:
        raise WireError("malformed", f"{name}: dtype {a.dtype} not allowed on the wire")
    w.raw(struct.pack("<BB", code, a.ndim))
    for d in a.shape:
        w.u32(d)
    w.raw(np.ascontiguousarray(a, dtype=_DTYPES[code]).tobytes())


def _array_decoder(name: str) -> Callable[[_Reader], np.ndarray]:
    """The decoder of one ndarray field (its error labels built once, not per message)."""
    head_what, shape_what, data_what = f"{name}.dtype", f"{name}.shape", f"{name}.data"

    def dec_array(r: _Reader) -> np.ndarray:
        code, ndim = r.unpack("<BB", head_what, both=True)
        dt = _DTYPES.get(code)
        if dt is None:
            raise WireError("malformed", f"{name}: unknown dtype code {code}")
        if ndim > r.limits.max_ndim:
            raise WireError("oversized", f"{name}: {ndim} dimensions exceed limit {r.limits.max_ndim}")
        dims = _DIMS[ndim] if ndim < len(_DIMS) else struct.Struct(f"<{ndim}I")
        shape = tuple(dims.unpack(r.take(dims.size, shape_what)))
        n = 1
        for d in shape:
            n *= d
        if n > r.limits.max_array_elements:
            raise WireError("oversized", f"{name}: {n} elements exceed limit {r.limits.max_array_elements}")
        buf = r.take(n * dt.itemsize, data_what)
        return np.frombuffer(buf, dtype=dt).reshape(shape).copy()

    return dec_array


def _field_codec(tp: Any, name: str) -> tuple[Callable[[_Writer, Any], None], Callable[[_Reader], Any]]:
    """Return (encode, decode) callables for one annotated type."""
    origin = typing.get_origin(tp)
    if tp is int:

        def enc_int(w: _Writer, v: Any) -> None:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise WireError("malformed", f"{name}: expected int, got {type(v).__name__}")
            try:
                w.raw(struct.pack("<q", int(v)))
            except struct.error as exc:
                raise WireError("malformed", f"{name}: {exc}") from None

        return enc_int, lambda r: int(r.unpack("<q", name))
    if tp is float:

        def enc_float(w: _Writer, v: Any) -> None:
            if not isinstance(v, (int, float, np.floating)) or isinstance(v, bool):
                raise WireError("malformed", f"{name}: expected float, got {type(v).__name__}")
            w.raw(struct.pack("<d", float(v)))

        return enc_float, lambda r: float(r.unpack("<d", name))
    if tp is bool:

        def dec_bool(r: _Reader) -> bool:
            b = r.unpack("<B", name)
            if b > 1:
                raise WireError("malformed", f"{name}: bool byte {b} is not 0 or 1")
            return bool(b)

        return (lambda w, v: w.raw(struct.pack("<B", 1 if v else 0))), dec_bool
    if tp is str:

        def enc_str(w: _Writer, v: Any) -> None:
            if not isinstance(v, str):
                raise WireError("malformed", f"{name}: expected str, got {type(v).__name__}")
            b = v.encode("utf-8")
            w.u32(len(b))
            w.raw(b)

        len_what = f"{name}.len"

        def dec_str(r: _Reader) -> str:
            n = r.count(len_what, r.limits.max_text_bytes)
            try:
                return bytes(r.take(n, name)).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise WireError("malformed", f"{name}: invalid UTF-8 ({exc.reason})") from None

        return enc_str, dec_str
    if tp is bytes:

        def enc_bytes(w: _Writer, v: Any) -> None:
            if not isinstance(v, (bytes, bytearray)):
                raise WireError("malformed", f"{name}: expected bytes, got {type(v).__name__}")
            w.u32(len(v))
            w.raw(bytes(v))

        bytes_len_what = f"{name}.len"
        return enc_bytes, lambda r: bytes(r.take(r.count(bytes_len_what, r.limits.max_message_bytes), name))
    if tp is np.ndarray:
        return (lambda w, v: _encode_array(w, v, name)), _array_decoder(name)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{name}: only homogeneous tuple[T, ...] is supported")
        item_enc, item_dec = _field_codec(args[0], f"{name}[]")

        def enc_tuple(w: _Writer, v: Any) -> None:
            if not isinstance(v, (tuple, list)):
                raise WireError("malformed", f"{name}: expected a sequence, got {type(v).__name__}")
            w.u32(len(v))
            for item in v:
                item_enc(w, item)

        count_what = f"{name}.count"

        def dec_tuple(r: _Reader) -> tuple[Any, ...]:
            n = r.count(count_what, r.limits.max_items)
            return tuple(item_dec(r) for _ in range(n))

        return enc_tuple, dec_tuple
    raise TypeError(f"{name}: type {tp!r} has no wire encoding")


@dataclass(frozen=True)
class _ClassCodec:
    cls: type
    names: tuple[str, ...]
    encoders: tuple[Callable[[_Writer, Any], None], ...]
    decoders: tuple[Callable[[_Reader], Any], ...]


class Codec:
    """Encodes and decodes a fixed set of message classes, each with a unique KIND."""

    def __init__(self, classes: typing.Iterable[type], limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._by_kind: dict[int, _ClassCodec] = {}
        self._by_cls: dict[type, _ClassCodec] = {}
        for cls in classes:
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} is not a dataclass")
            kind = int(getattr(cls, "KIND"))
            if not 0 < kind < 256 or kind in self._by_kind:
                raise TypeError(f"{cls.__name__}: KIND {kind} is invalid or taken")
            hints = typing.get_type_hints(cls)
            fields = [f for f in dataclasses.fields(cls) if f.init]
            codecs = [_field_codec(hints[f.name], f"{cls.__name__}.{f.name}") for f in fields]
            cc = _ClassCodec(
                cls,
                tuple(f.name for f in fields),
                tuple(c[0] for c in codecs),
                tuple(c[1] for c in codecs),
            )
            self._by_kind[kind] = cc
            self._by_cls[cls] = cc

    def encode(self, msg: Any) -> bytes:
        cc = self._by_cls.get(type(msg))
        if cc is None:
            raise WireError("malformed", f"{type(msg).__name__} is not a registered message")
        w = _Writer()
        w.raw(MAGIC + struct.pack("<BB", WIRE_VERSION, type(msg).KIND))
        for fname, enc in zip(cc.names, cc.encoders):
            enc(w, getattr(msg, fname))
        out = b"".join(w.parts)
        if len(out) > self.limits.max_message_bytes:
            raise WireError("oversized", f"{len(out)} bytes exceed limit {self.limits.max_message_bytes}")
        return out

    def decode(self, data: bytes | memoryview, expected: type[M] | None = None) -> M:
        if len(data) > self.limits.max_message_bytes:
            raise WireError("oversized", f"{len(data)} bytes exceed limit {self.limits.max_message_bytes}")
        r = _Reader(data, self.limits)
        if bytes(r.take(2, "magic")) != MAGIC:
            raise WireError("bad_magic", "not a crowdfl message")
        version = r.unpack("<B", "version")
        if version != WIRE_VERSION:
            raise WireError("bad_version", f"wire version {version}, this build speaks {WIRE_VERSION}")
        kind = r.unpack("<B", "kind")
        cc = self._by_kind.get(kind)
        if cc is None:
            raise WireError("unknown_kind", f"message kind {kind}")
        if expected is not None and cc.cls is not expected:
            raise WireError("unexpected_kind", f"got {cc.cls.__name__}, expected {expected.__name__}")
        values = {fname: dec(r) for fname, dec in zip(cc.names, cc.decoders)}
        if r.pos != len(r.view):
            raise WireError("trailing_bytes", f"{len(r.view) - r.pos} bytes after the last field")
        try:
            return typing.cast(M, cc.cls(**values))
        except (TypeError, ValueError) as exc:
            raise WireError("malformed", f"{cc.cls.__name__}: {exc}") from None


def fields_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Deep equality over message fields, arrays compared by dtype, shape and bytes."""
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            if not (isinstance(va, np.ndarray) and isinstance(vb, np.ndarray)):
                return False
            if va.dtype != vb.dtype or va.shape != vb.shape or va.tobytes() != vb.tobytes():
                return False
        elif isinstance(va, tuple) and va and isinstance(va[0], np.ndarray):
            if len(va) != len(vb) or not all(
                fields_equal({"x": x}, {"x": y}) for x, y in zip(va, vb)
            ):
                return False
        elif va != vb:
            return False
    return True
