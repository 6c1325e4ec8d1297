"""A fast GGUF (v2/v3) reader: the subset of ``gguf.GGUFReader``'s interface that kvlab uses.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array, which costs
~24 s for a 262k-entry vocabulary (Gemma 3). Here the header is parsed in one pass over an
``mmap`` with ``struct``: string arrays become a list of ``str`` directly, numeric arrays one
``np.frombuffer`` each. Tensor data are views of one ``np.memmap`` of the file, made on first
access, shaped as ``GGUFReader`` shapes them (see :class:`Tensor`). The constants (value types,
quant types, block sizes) come from ``gguf.constants``; dequantization stays in
``gguf.quants.dequantize``.

File layout (all little-endian unless the version reads as byte-swapped, then big-endian)::

  magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
  n_kv x (string key | u32 value_type | value)        string = u64 length + utf-8 bytes
                                                      array  = u32 item_type + u64 n + n items
  n_tensors x (string name | u32 n_dims | u64 dims[n_dims] | u32 ggml_type | u64 offset)
  padding to ``general.alignment`` (default 32) | tensor data (offsets relative to here)
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC
from gguf.constants import GGMLQuantizationType, GGUFValueType

_SUPPORTED_VERSIONS = (2, 3)

# value type -> struct code of a scalar (byte order prepended per file).
_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d", GGUFValueType.BOOL: "?",
}
# value type -> numpy dtype of an array of it.
_NP = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64, GGUFValueType.BOOL: np.bool_,
}
# ggml types whose data GGUFReader exposes as typed elements (others: raw bytes per row).
_PLAIN = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class Field:
  """One metadata key/value. ``types``: the value type, then (for arrays) the item types down
  to the innermost, as in ``GGUFReader``; ``value``: the decoded Python value (``str``, ``int``,
  ``float``, ``bool``, or a list of them; nested arrays are nested lists)."""

  __slots__ = ("name", "offset", "types", "value")

  def __init__(self, name: str, offset: int, types: list[GGUFValueType], value: Any):
    self.name, self.offset, self.types, self.value = name, offset, types, value

  def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
    """The value (an array's items indexed by ``index_or_slice``), like ``ReaderField``'s."""
    if isinstance(self.value, list):
      return self.value[index_or_slice]
    return self.value

  def __repr__(self):
    return f"Field({self.name!r}, {[t.name for t in self.types]})"


class Tensor:
  """One tensor's info. ``shape``: GGUF order (innermost first), uint64 ``[n_dims]``;
  ``data``: a read-only memmap view, for F32/F16/F64/I8..I64 typed and shaped
  ``reversed(shape)``, for every other type uint8 ``[*reversed(shape)[:-1], bytes_per_row]``
  (what ``gguf.quants.dequantize`` takes, as ``GGUFReader`` gives)."""

  __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "_mm",
               "_order", "_data")

  def __init__(self, name, tensor_type, shape, data_offset, mm, order):
    self.name = name
    self.tensor_type = tensor_type
    self.shape = shape
    self.n_elements = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    block, type_size = GGML_QUANT_SIZES[tensor_type]
    self.n_bytes = self.n_elements * type_size // block
    self.data_offset = data_offset
    self._mm, self._order, self._data = mm, order, None

  @property
  def data(self) -> np.ndarray:
    if self._data is None:
      dims = tuple(int(d) for d in reversed(self.shape.tolist()))
      plain = _PLAIN.get(self.tensor_type)
      if plain is not None:
        dtype = np.dtype(plain).newbyteorder(self._order)
      else:
        block, type_size = GGML_QUANT_SIZES[self.tensor_type]
        if dims[-1] % block:
          raise ValueError(f"tensor {self.name}: row length {dims[-1]} is not a multiple of "
                           f"{self.tensor_type.name}'s block size {block}")
        dtype, dims = np.dtype(np.uint8), (*dims[:-1], dims[-1] // block * type_size)
      end = self.data_offset + self.n_bytes
      if end > len(self._mm):
        raise ValueError(f"tensor {self.name} ends at byte {end} past the end of the file "
                         f"({len(self._mm)} bytes): the file is truncated")
      self._data = self._mm[self.data_offset:end].view(dtype).reshape(dims)
    return self._data

  def __repr__(self):
    return f"Tensor({self.name!r}, {self.tensor_type.name}, {self.shape.tolist()})"


class GGUFFile:
  """A parsed GGUF file: ``fields`` (dict key -> :class:`Field`, in file order, including
  ``GGUF.version``/``GGUF.tensor_count``/``GGUF.kv_count`` as GGUFReader does), ``tensors``
  (list of :class:`Tensor`), ``alignment``, ``data_offset``, ``byte_order`` ('<' or '>')."""

  def __init__(self, path: str | os.PathLike[str]):
    with open(path, "rb") as f:
      self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # empty file: ValueError
    self.path = os.fspath(path)
    self.fields: dict[str, Field] = {}
    self.tensors: list[Tensor] = []
    self._parse()

  def get_field(self, key: str) -> Field | None:
    return self.fields.get(key)

  # -- parsing ----------------------------------------------------------------------------------
  def _need(self, off: int, n: int, what: str) -> None:
    if off + n > len(self._buf):
      raise ValueError(f"GGUF header ends early: {what} at byte {off} needs {n} bytes but the "
                       f"file has {len(self._buf)}: the file is truncated")

  def _unpack(self, code: str, off: int, what: str):
    s = struct.Struct(self.byte_order + code)
    self._need(off, s.size, what)
    return s.unpack_from(self._buf, off)

  def _string(self, off: int, what: str) -> tuple[str, int]:
    (n,) = self._unpack("Q", off, what)
    self._need(off + 8, n, what)
    return self._buf[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n

  def _strings(self, off: int, count: int, what: str) -> tuple[list[str], int]:
    """``count`` length-prefixed strings from ``off``: one loop of unpack_from + slicing."""
    buf, size = self._buf, len(self._buf)
    unpack = struct.Struct(self.byte_order + "Q").unpack_from
    out = [None] * count
    for i in range(count):
      if off + 8 > size:
        self._need(off, 8, what)
      (n,) = unpack(buf, off)
      off += 8
      end = off + n
      if end > size:
        self._need(off, n, what)
      out[i] = buf[off:end].decode("utf-8")
      off = end
    return out, off

  def _value(self, off: int, vtype: int, what: str) -> tuple[Any, list[GGUFValueType], int]:
    """(decoded value, types, offset after it) of a value of type ``vtype`` at ``off``."""
    try:
      vtype = GGUFValueType(vtype)
    except ValueError:
      raise ValueError(f"{what}: unknown GGUF value type {vtype} at byte {off}: the file is "
                       "corrupt") from None
    if vtype == GGUFValueType.STRING:
      s, off = self._string(off, what)
      return s, [vtype], off
    code = _SCALAR.get(vtype)
    if code is not None:
      (v,) = self._unpack(code, off, what)
      return v, [vtype], off + struct.calcsize(code)
    # ARRAY
    itype, n = self._unpack("IQ", off, what)
    off += 12
    try:
      item = GGUFValueType(itype)
    except ValueError:
      raise ValueError(f"{what}: unknown GGUF array item type {itype} at byte {off}: the file is "
                       "corrupt") from None
    if item == GGUFValueType.STRING:
      vals, off = self._strings(off, n, what)
      return vals, [vtype, item] if n else [vtype], off
    if item in _NP:
      dt = np.dtype(_NP[item]).newbyteorder(self.byte_order)
      self._need(off, n * dt.itemsize, what)
      arr = np.frombuffer(self._buf, dt, n, off)
      return arr.tolist(), [vtype, item] if n else [vtype], off + n * dt.itemsize
    # nested arrays: each item carries its own item type and length.
    vals, types = [], [vtype]
    for i in range(n):
      v, t, off = self._value(off, item, what)
      vals.append(v)
      if i == 0:
        types += t
    return vals, types, off

  def _parse(self) -> None:
    buf = self._buf
    if len(buf) < 24:
      raise ValueError(f"file is {len(buf)} bytes, too short for a GGUF header: truncated")
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != GGUF_MAGIC:
      raise ValueError(f"GGUF magic invalid: the file starts with {bytes(buf[:4])!r}, not b'GGUF'")
    (version,) = struct.unpack_from("<I", buf, 4)
    self.byte_order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
      self.byte_order = ">"
      (version,) = struct.unpack_from(">I", buf, 4)
    if version not in _SUPPORTED_VERSIONS:
      raise ValueError(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors, n_kv = self._unpack("QQ", 8, "counts")
    u32, u64 = GGUFValueType.UINT32, GGUFValueType.UINT64
    self.fields["GGUF.version"] = Field("GGUF.version", 4, [u32], version)
    self.fields["GGUF.tensor_count"] = Field("GGUF.tensor_count", 8, [u64], n_tensors)
    self.fields["GGUF.kv_count"] = Field("GGUF.kv_count", 16, [u64], n_kv)
    off = 24
    for _ in range(n_kv):
      start = off
      key, off = self._string(off, "metadata key")
      (vtype,) = self._unpack("I", off, key)
      value, types, off = self._value(off + 4, vtype, key)
      if key in self.fields:
        raise ValueError(f"duplicate metadata key {key!r} at byte {start}: the file is corrupt")
      self.fields[key] = Field(key, start, types, value)

    infos = []
    for _ in range(n_tensors):
      name, off = self._string(off, "tensor name")
      (n_dims,) = self._unpack("I", off, name)
      off += 4
      self._need(off, 8 * n_dims, name)
      dims = np.frombuffer(buf, np.dtype(np.uint64).newbyteorder(self.byte_order), n_dims,
                           off).astype(np.uint64)
      off += 8 * n_dims
      ggml_type, rel = self._unpack("IQ", off, name)
      off += 12
      try:
        ggml_type = GGMLQuantizationType(ggml_type)
      except ValueError:
        raise ValueError(f"tensor {name}: unknown ggml type {ggml_type}: the file is corrupt or "
                         "newer than the installed gguf package") from None
      infos.append((name, ggml_type, dims, rel))

    align = self.fields.get("general.alignment")
    self.alignment = GGUF_DEFAULT_ALIGNMENT
    if align is not None:
      if align.types != [GGUFValueType.UINT32]:
        raise ValueError("bad type for general.alignment (must be uint32)")
      self.alignment = align.value
      if self.alignment == 0 or self.alignment & (self.alignment - 1):
        raise ValueError(f"invalid general.alignment {self.alignment}: not a power of two")
    self.data_offset = -(-off // self.alignment) * self.alignment

    data = np.memmap(self.path, mode="r")
    seen = set()
    for name, ggml_type, dims, rel in infos:
      if name in seen:
        raise ValueError(f"duplicate tensor {name!r}: the file is corrupt")
      seen.add(name)
      self.tensors.append(Tensor(name, ggml_type, dims, self.data_offset + rel, data,
                                 self.byte_order))
