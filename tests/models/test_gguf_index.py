"""kiln's GGUF tensor index against gguf's own GGUFReader (the oracle): the same architecture, and
for every tensor the same name, type, dtype, shape and bytes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from kiln.model.gguf_index import read_gguf_tensors


def _assert_same_as_gguf_reader(path: str) -> None:
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    architecture, tensors = read_gguf_tensors(path)
    assert architecture == bytes(field.parts[field.data[0]]).decode()
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.tensor_type == theirs.tensor_type, ours.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_the_embedded_model(smollm_path):
    _assert_same_as_gguf_reader(smollm_path)


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_of_every_kind_is_stepped_over(tmp_path, alignment):
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, arch="qwen2")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "tiny ✓")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "ccc ✓"] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    writer.add_array("some.nested", [[1, 2], [3]])
    writer.add_bool("some.flag", True)
    writer.add_float64("some.float64", 1.25)
    writer.add_uint64("some.uint64", 2**40)
    writer.add_int8("some.int8", -3)
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((8, 64), dtype=np.float32)
    writer.add_tensor("a.f32", weights)
    writer.add_tensor("b.f16", weights[:3, :5].astype(np.float16))
    writer.add_tensor("c.i32", np.arange(7, dtype=np.int32))
    quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("d.q8_0", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_same_as_gguf_reader(path)
    _, tensors = read_gguf_tensors(path)
    dequantized = gguf.dequantize(tensors[3].data, tensors[3].tensor_type)
    assert dequantized.shape == weights.shape and np.allclose(dequantized, weights, atol=0.05)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_tensors(str(path))
