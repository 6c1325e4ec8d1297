"""``models.gguf_reader.GGUFFile`` reads what ``gguf.GGUFReader`` reads: every field, every
tensor's info, bytes and dequantized values (a small written file of every value type; the
default model's GGUF in the slow test), and refuses bad files clearly."""

import gguf
import numpy as np
import pytest

from kvlab.models import gguf_loader
from kvlab.models.gguf_reader import GGUFFile
from kvlab.models.safetensors_loader import CheckpointError

VT, QT = gguf.GGUFValueType, gguf.GGMLQuantizationType


def _flat(v):
  """GGUFReader's ``contents()`` flattens nested arrays; ours keeps them nested."""
  if isinstance(v, list):
    return [y for x in v for y in (_flat(x) if isinstance(x, list) else [x])]
  return v


def _same_value(a, b):
  if isinstance(a, float) and np.isnan(a):
    return isinstance(b, float) and np.isnan(b)
  return a == b and type(a) is type(b)


def assert_same(ref, ours, check_data=True):
  """Every field (value, types) and tensor (info, data, dequantized) of ``ref`` (a
  ``gguf.GGUFReader``) equals ``ours`` (a ``GGUFFile``)."""
  assert list(ref.fields) == list(ours.fields)
  for key, f in ref.fields.items():
    g = ours.fields[key]
    a, b = f.contents(), _flat(g.contents())
    assert f.types == g.types, key
    if isinstance(a, list):
      assert len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b)), key
    else:
      assert _same_value(a, b), (key, a, b)
    if isinstance(a, list) and a and not isinstance(g.contents()[0], list):
      assert _same_value(f.contents(1 % len(a)), g.contents(1 % len(a))), key
  assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
  assert len(ref.tensors) == len(ours.tensors)
  for t, u in zip(ref.tensors, ours.tensors):
    assert (t.name, t.tensor_type, t.n_elements, t.n_bytes, t.data_offset) == (
        u.name, u.tensor_type, u.n_elements, u.n_bytes, u.data_offset)
    assert t.shape.tolist() == u.shape.tolist() and u.shape.dtype == np.uint64
    if not check_data:
      continue
    assert (t.data.shape, t.data.dtype) == (u.data.shape, u.data.dtype), t.name
    np.testing.assert_array_equal(np.asarray(t.data), np.asarray(u.data), err_msg=t.name)
    if t.tensor_type not in (QT.I8, QT.I16, QT.I32, QT.I64, QT.F64):
      np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                    gguf.quants.dequantize(u.data, u.tensor_type), err_msg=t.name)


def _q4_k_bytes(rng, rows, cols):
  """Random Q4_K blocks (gguf-py cannot quantize K-quants) with finite f16 scales d, dmin."""
  b = rng.randint(0, 256, size=(rows, cols // 256, 144)).astype(np.uint8)
  b[..., 0:4] = np.array([0.01, 0.002], np.float16).view(np.uint8)
  return b.reshape(rows, cols // 256 * 144)


def write_small(path, endian=None, alignment=None):
  """A GGUF with metadata of every value type and F32/F16/BF16/Q8_0/Q4_0/Q4_K/I32 tensors."""
  kw = {} if endian is None else {"endianess": endian}
  w = gguf.GGUFWriter(str(path), "llama", **kw)
  if alignment:
    w.add_custom_alignment(alignment)
  for name, v in [("uint8", 200), ("int8", -5), ("uint16", 60000), ("int16", -30000),
                  ("uint32", 4_000_000_000), ("int32", -2_000_000_000),
                  ("uint64", 2 ** 63 + 5), ("int64", -(2 ** 62)),
                  ("float32", 0.1), ("float64", 1 / 3), ("bool", True), ("string", "héllo ✓")]:
    w.add_key_value(f"t.{name}", v, VT[name.upper()])
  w.add_key_value("t.bool_false", False, VT.BOOL)
  w.add_key_value("t.nan", float("nan"), VT.FLOAT32)
  w.add_key_value("t.strings", ["a", "", "ü ñ", "<0x0A>", "x" * 300, "▁the"], VT.ARRAY)
  w.add_key_value("t.int32s", [1, -2, 3], VT.ARRAY)
  w.add_key_value("t.uint64s", [0, 2 ** 64 - 1], VT.ARRAY, VT.UINT64)
  w.add_key_value("t.uint8s", [0, 255, 7], VT.ARRAY, VT.UINT8)
  w.add_key_value("t.float32s", [0.5, -1.25, 1e-8], VT.ARRAY)
  w.add_key_value("t.float64s", [0.1, 2.5], VT.ARRAY, VT.FLOAT64)
  w.add_key_value("t.bools", [True, False, True], VT.ARRAY)
  w.add_key_value("t.nested", [[1, 2], [3, 4]], VT.ARRAY)
  w.add_key_value("t.nested_strings", [["a", "bc"], ["d"]], VT.ARRAY)
  rng = np.random.RandomState(0)
  x = rng.randn(8, 256).astype(np.float32)
  w.add_tensor("f32", x)
  w.add_tensor("f32_1d", rng.randn(7).astype(np.float32))
  w.add_tensor("f16", x.astype(np.float16))
  w.add_tensor("i32", rng.randint(-9, 9, size=(3, 5)).astype(np.int32))
  for qt in (QT.BF16, QT.Q8_0, QT.Q4_0):
    w.add_tensor(qt.name.lower(), gguf.quants.quantize(x, qt), raw_dtype=qt)
  w.add_tensor("q4_k", _q4_k_bytes(rng, 4, 512), raw_dtype=QT.Q4_K)
  w.add_tensor("q8_0_3d", gguf.quants.quantize(rng.randn(2, 3, 64).astype(np.float32), QT.Q8_0),
               raw_dtype=QT.Q8_0)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.mark.parametrize("endian,alignment", [(None, None), ("big", None), (None, 64)])
def test_small_file_matches_gguf_reader(tmp_path, endian, alignment):
  e = {None: None, "big": gguf.GGUFEndian.BIG}[endian]
  path = write_small(tmp_path / "s.gguf", e, alignment)
  ref, ours = gguf.GGUFReader(path), GGUFFile(path)
  assert_same(ref, ours)
  assert ours.byte_order == (">" if endian == "big" else "<")
  assert ours.alignment == (alignment or 32)
  assert gguf_loader.field(ours, "t.nested") == [[1, 2], [3, 4]]
  assert gguf_loader.field(ours, "t.strings")[2] == "ü ñ"
  assert gguf_loader.field(ours, "t.missing", 7) == 7
  assert gguf_loader.field(ours, "t.float64") == 1 / 3
  q = {t.name: t for t in ours.tensors}
  assert q["f32"].data.shape == (8, 256) and q["f32_1d"].data.shape == (7,)
  assert q["q8_0"].data.shape == (8, 256 // 32 * 34) and q["q8_0"].data.dtype == np.uint8
  assert q["q8_0_3d"].data.shape == (2, 3, 68)
  assert q["q4_k"].data.shape == (4, 2 * 144)


def test_open_gguf_uses_fast_reader(tmp_path):
  reader = gguf_loader.open_gguf(write_small(tmp_path / "s.gguf"))
  assert isinstance(reader, GGUFFile)


@pytest.mark.parametrize("damage,match", [
    (lambda b: b"GGUX" + b[4:], "magic invalid.*truncated or corrupt"),
    (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "version 99"),
    (lambda b: b[:60], "truncated"),
    (lambda b: b[:-100], "truncated"),
    (lambda b: b"", "truncated or corrupt"),
])
def test_bad_files_give_clear_errors(tmp_path, damage, match):
  data = open(write_small(tmp_path / "s.gguf"), "rb").read()
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(damage(data))
  with pytest.raises(CheckpointError, match=match):
    gguf_loader.open_gguf(str(bad))


@pytest.mark.slow
def test_default_model_gguf_matches_gguf_reader():
  """All fields and all tensor bytes / dequantized values of the default model's real GGUF."""
  from kvlab.models import registry  # pylint: disable=g-import-not-at-top
  path = registry.resolve("smollm2-135m")[1]
  assert_same(gguf.GGUFReader(path), GGUFFile(path))
