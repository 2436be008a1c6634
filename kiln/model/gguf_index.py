"""A GGUF file's tensors (name, type, raw data mapped from the file) and its architecture name,
read without parsing the rest of the metadata.

`gguf.GGUFReader` turns every metadata value into numpy views, element by element: for a 49k-token
vocabulary and its merges that is ~4 s of Python on every model load, for values the loader never
reads (the tokenizer comes from transformers' conversion, cached). Here metadata values are only
stepped over. The tensors come out as GGUFReader would give them (the same dtype and shape of the
same bytes), so `gguf.dequantize` takes them as before. Little-endian files only (what llama.cpp
writes); others are read with GGUFReader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUFValueType -> struct format of a scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any
    """A gguf.GGMLQuantizationType."""
    data: np.ndarray


def read_gguf_tensors(path: str) -> tuple[str, list[GGUFTensor]]:
    """(general.architecture, the tensors in file order)."""
    data = np.memmap(path, mode="r")
    buffer = memoryview(data)
    if bytes(buffer[:4]) != _MAGIC:
        raise ValueError(f"{path} is not a GGUF file")
    version = struct.unpack_from("<I", buffer, 4)[0]
    if version & 0xFFFF == 0:  # a big-endian file: leave it to the reference reader
        return _read_with_gguf_reader(path)
    tensor_count, kv_count = struct.unpack_from("<QQ", buffer, 8)
    offset = 24
    architecture, alignment = "", _DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key, offset = _string(buffer, offset)
        (value_type,), offset = struct.unpack_from("<I", buffer, offset), offset + 4
        if key == "general.architecture" and value_type == _STRING:
            architecture, offset = _string(buffer, offset)
        elif key == "general.alignment" and value_type == 4:
            (alignment,), offset = struct.unpack_from("<I", buffer, offset), offset + 4
        else:
            offset = _skip_value(buffer, offset, value_type)
    infos = []
    for _ in range(tensor_count):
        name, offset = _string(buffer, offset)
        (n_dims,), offset = struct.unpack_from("<I", buffer, offset), offset + 4
        dims = struct.unpack_from(f"<{n_dims}Q", buffer, offset)
        offset += 8 * n_dims
        raw_type, tensor_offset = struct.unpack_from("<IQ", buffer, offset)
        offset += 12
        infos.append((name, dims, raw_type, tensor_offset))
    data_start = -(-offset // alignment) * alignment
    return architecture, [_tensor(data, data_start, *info) for info in infos]


def _tensor(data: np.ndarray, data_start: int, name: str, dims: tuple[int, ...], raw_type: int,
            tensor_offset: int) -> GGUFTensor:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    ggml_type = GGMLQuantizationType(raw_type)
    n_elements = int(np.prod(dims))
    shape = tuple(reversed(dims))
    plain = _PLAIN_DTYPES.get(ggml_type.name)
    start = data_start + tensor_offset
    if plain is not None:
        dtype = np.dtype(plain)
        array = data[start:start + n_elements * dtype.itemsize].view(dtype).reshape(shape)
    else:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        array = data[start:start + n_bytes].reshape(quant_shape_to_byte_shape(shape, ggml_type))
    return GGUFTensor(name, ggml_type, array)


_PLAIN_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                 "I32": np.int32, "I64": np.int64}


def _string(buffer: memoryview, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buffer, offset)
    start = offset + 8
    return str(buffer[start:start + length], "utf-8"), start + length


def _skip_value(buffer: memoryview, offset: int, value_type: int) -> int:
    if value_type == _STRING:
        return offset + 8 + struct.unpack_from("<Q", buffer, offset)[0]
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", buffer, offset)
        offset += 12
        if item_type in _SCALARS:
            return offset + count * struct.calcsize("<" + _SCALARS[item_type])
        for _ in range(count):  # strings or nested arrays: each carries its own length
            offset = _skip_value(buffer, offset, item_type)
        return offset
    return offset + struct.calcsize("<" + _SCALARS[value_type])


def _read_with_gguf_reader(path: str) -> tuple[str, list[GGUFTensor]]:
    import gguf

    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    architecture = bytes(field.parts[field.data[0]]).decode()
    return architecture, [GGUFTensor(t.name, t.tensor_type, t.data) for t in reader.tensors]
