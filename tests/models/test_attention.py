"""The paged attention backend against a direct computation: for every sequence, softmax(q k^T)
v over its own keys (causal, optionally inside a sliding window), with K/V taken from the tokens
written so far. Random block tables, mixed decode and prefill-chunk batches, GQA."""

from __future__ import annotations

import pytest
import torch

from kiln.model.forward_context import forward_context
from kiln.model.layers import attention, kv_layout, native
from kiln.model.layers.attention import Attention

HEADS, KV_HEADS = 6, 2
# (head_dim, block_size, prompt chunk lengths of the first two steps): the small shape, and the
# shape of the kernels' bfloat16 tile path (16-key blocks, head_dim a multiple of 32), whose
# sequences span several blocks and start windows inside a block.
GEOMETRIES = {"small": (8, 4, ([13, 3, 9, 1], [1, 6, 1, 1])), "tiles16": (64, 16, ([29, 3, 17, 1], [1, 20, 1, 1]))}


def reference(q, keys, values, positions, scale, window):
    """q [Q, H, D] at `positions` over keys/values [L, KH, D] (the sequence so far)."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # [L, H, D]
    scores = torch.einsum("qhd,lhd->hql", q.double(), k.double()) * scale
    key_pos = torch.arange(keys.shape[0])
    visible = key_pos[None, :] <= positions[:, None]
    if window is not None:
        visible &= key_pos[None, :] > positions[:, None] - window
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hql,lhd->qhd", probs, v.double())


@pytest.fixture(params=["native", "torch", "triton", "cuda", "cuda-torch"])
def decode_path(request, monkeypatch) -> str:
    """Attend through the native CPU kernels (where the shape fits them), through the torch backend,
    or through the CUDA backend's Triton kernel, run here by Triton's interpreter (with the torch
    cache write, as on CUDA); on a GPU, through the compiled Triton kernel and through the torch
    backend (CUDA without Triton). Returns the device the path's tensors live on."""
    if request.param.startswith("cuda"):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if request.param == "cuda-torch":
            monkeypatch.setattr(attention, "_triton_kernel", lambda k_cache, pairs_layout: None)
        return "cuda"
    if request.param == "triton":
        request.getfixturevalue("triton_attention_backend")
    elif request.param == "torch":
        monkeypatch.setattr(attention, "_decode_kernel", lambda device: None)
        monkeypatch.setattr(attention, "prefill_kernel", lambda k_cache, pairs_layout, q_dtype: None)
        monkeypatch.setattr(attention, "_cache_writer", lambda k_cache: None)
    elif native.paged_decode_attention() is None:
        pytest.skip("the native kernels could not be built here")
    return "cpu"


def test_native_kernels_build_on_the_test_machine():
    """CI machines have g++ and ninja: the fast path must not silently fall back there."""
    from kiln.config import env_native_kernels

    if not env_native_kernels():
        pytest.skip("KILN_NATIVE_KERNELS=0")
    assert native.paged_decode_attention() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_cache_write_matches_index_copy(dtype):
    """The native KV write reads k and v as strided views of a fused QKV output, as the models pass
    them, and lands each token's heads where the torch path's index_copy_ does; padding slots (-1)
    are skipped."""
    writer = native.write_kv_cache()
    if writer is None:
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    num_blocks, block, head_dim, tokens = 6, 4, 8, 7
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * head_dim).to(dtype)
    k = qkv[:, HEADS * head_dim:(HEADS + KV_HEADS) * head_dim]
    v = qkv[:, (HEADS + KV_HEADS) * head_dim:]
    slots = torch.randperm(num_blocks * block)[:tokens]
    slots[3] = -1
    shape = (num_blocks, KV_HEADS, block, head_dim)
    k_cache, v_cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block, :, slot % block] = k[t].view(KV_HEADS, head_dim)
            expected_v[slot // block, :, slot % block] = v[t].view(KV_HEADS, head_dim)
    writer(k, v, k_cache, v_cache, slots, False)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    with pytest.raises(RuntimeError, match="outside the cache"):
        writer(k, v, k_cache, v_cache, torch.full((tokens,), num_blocks * block), False)


def test_pairs_layout_places_each_value_where_the_layout_says():
    """Key t, dimension d of a pairs-layout tile sits at ((d // 2) * 16 + t) * 2 + d % 2, value t, d at
    ((t // 2) * D + d) * 2 + t % 2 (the layout's definition, element by element); the torch writer,
    the native writer and the torch readers agree with it."""
    torch.manual_seed(0)
    num_blocks, block, head_dim, tokens = 5, 16, 64, 23
    key = torch.randn(tokens, KV_HEADS * head_dim).to(torch.bfloat16)
    value = torch.randn(tokens, KV_HEADS * head_dim).to(torch.bfloat16)
    slots = torch.randperm(num_blocks * block)[:tokens]
    shape = (num_blocks, KV_HEADS, block, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)
    kv_layout.write_pairs(k_cache, v_cache, key, value, slots)
    k_tiles, v_tiles = k_cache.view(num_blocks, KV_HEADS, -1), v_cache.view(num_blocks, KV_HEADS, -1)
    for t, slot in enumerate(slots.tolist()):
        b, offset = divmod(slot, block)
        for h in range(KV_HEADS):
            for d in (0, 1, 17, head_dim - 1):
                assert k_tiles[b, h, ((d // 2) * block + offset) * 2 + d % 2] == key[t, h * head_dim + d]
                assert v_tiles[b, h, ((offset // 2) * head_dim + d) * 2 + offset % 2] == value[t, h * head_dim + d]
    key_rows = kv_layout.pairs_keys_as_rows(k_tiles.transpose(0, 1), head_dim)  # [KH, blocks * 16, D]
    value_rows = kv_layout.pairs_values_as_rows(v_tiles.transpose(0, 1), head_dim)
    assert torch.equal(key_rows[:, slots].transpose(0, 1).flatten(1), key)
    assert torch.equal(value_rows[:, slots].transpose(0, 1).flatten(1), value)
    writer = native.write_kv_cache()
    if writer is None or not native.pairs_layout_available():
        pytest.skip("the native pairs-layout kernels do not run here")
    native_k, native_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    writer(key, value, native_k, native_v, slots, True)
    assert torch.equal(native_k, k_cache) and torch.equal(native_v, v_cache)


@pytest.fixture(params=[None, 8], ids=["threads-default", "threads-8"])
def intra_op_threads(request):
    """With more threads than sequences the decode kernel splits each sequence by kv head."""
    on_cuda = "decode_path" in request.fixturenames and request.getfixturevalue("decode_path") == "cuda"
    if request.param is not None and on_cuda:
        pytest.skip("CPU threads do not change a CUDA kernel")
    before = torch.get_num_threads()
    if request.param is not None:
        torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("window", [None, 5, 20])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_paged_attention_matches_direct_computation(geometry, window, dtype, tol, decode_path, make_attn_metadata,
                                                    intra_op_threads):
    head_dim, block, (first_step, second_step) = GEOMETRIES[geometry]
    layer = Attention(HEADS, KV_HEADS, head_dim, scale=head_dim**-0.5, sliding_window=window)
    steps = [first_step, second_step, [1, 1, 1, 1], [1, 1, 1, 1]]
    check_steps_against_reference(layer, block, dtype, tol, steps, make_attn_metadata, device=decode_path)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (5, 1), (8, 1)], ids=["group1", "group2", "group5", "group8"])
def test_every_gqa_group_size_matches_direct_computation(heads, kv_heads, decode_path, make_attn_metadata,
                                                          intra_op_threads):
    """The bfloat16 tile kernels take up to four query heads of a GQA group per tile load: groups of
    1, 2, 5 and 8 heads reach each head count and the split of larger groups."""
    layer = Attention(heads, kv_heads, 64, scale=64**-0.5)
    check_steps_against_reference(layer, 16, torch.bfloat16, 3e-2, [[21, 40, 1], [1, 1, 7], [1, 1, 1]],
                                  make_attn_metadata, device=decode_path)


@pytest.mark.parametrize("head_dim", [96, 128])
@pytest.mark.parametrize("window", [None, 20])
def test_other_head_dims_match_direct_computation(head_dim, window, decode_path, make_attn_metadata):
    """The prefill kernel specializes its tile loops for head_dim 64 and 128 (Qwen3, Llama) and keeps
    a general loop for other multiples of 32 (96 here)."""
    layer = Attention(6, 2, head_dim, scale=head_dim**-0.5, sliding_window=window)
    check_steps_against_reference(layer, 16, torch.bfloat16, 3e-2, [[29, 3, 17, 1], [1, 20, 1, 1], [1, 1, 1, 1]],
                                  make_attn_metadata, device=decode_path)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("window", [None, 20])
# float32 at 1e-4: the saturated keys give scores in the hundreds, whose float32 exp is off by ~1e-5
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fp8_caches_match_direct_computation_over_the_stored_values(cache_dtype, window, dtype, tol, decode_path,
                                                                     make_attn_metadata, intra_op_threads):
    """fp8 KV caches (rows layout) hold each key and value as `to_cache_dtype` casts it, saturated
    and subnormal values included; every path widens them exactly, so attention over them matches
    the direct computation over those values within the dtype's usual tolerance."""
    layer = Attention(6, 2, 64, scale=64**-0.5, sliding_window=window)
    check_steps_against_reference(layer, 16, dtype, tol, [[29, 3, 17, 1], [1, 20, 1, 1], [1, 1, 1, 1]],
                                  make_attn_metadata, cache_dtype=cache_dtype, device=decode_path)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_fp8_cache_write_matches_the_torch_cast(cache_dtype, dtype):
    """The native write stores the bytes `to_cache_dtype` gives: torch's rounding, saturation at the
    format's largest finite value (also for infinities), subnormals, NaN kept a NaN."""
    writer = native.write_kv_cache()
    if writer is None:
        pytest.skip("the native kernels could not be built here")
    torch.manual_seed(0)
    num_blocks, block, head_dim, tokens = 4, 16, 32, 9
    key = torch.randn(tokens, KV_HEADS * head_dim) * torch.logspace(-9, 6, KV_HEADS * head_dim, base=2)
    key[0, :6] = torch.tensor([float("inf"), -float("inf"), 1e6, -1e6, 464.0, 57344.0 * 1.06])
    value = -key.flip(0)
    value[1, 0] = float("nan")
    key, value = key.to(dtype), value.to(dtype)
    slots = torch.randperm(num_blocks * block)[:tokens]
    shape = (num_blocks, KV_HEADS, block, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    writer(key, value, k_cache, v_cache, slots, False)
    for t, slot in enumerate(slots.tolist()):
        for stored, x in ((k_cache.view(torch.uint8), key[t]), (v_cache.view(torch.uint8), value[t])):
            expected = kv_layout.to_cache_dtype(x.view(KV_HEADS, head_dim), cache_dtype).view(torch.uint8)
            assert torch.equal(stored[slot // block, :, slot % block], expected)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_native_fp8_write_rounds_every_boundary_as_torch(cache_dtype):
    """The native write narrows 8 values at a time with its own integer steps: every fp8 value, the
    midpoints between neighbours (ties to even) and the float32 values either side of each, both
    signs, the subnormal range, and a million random float32 bit patterns land as torch casts them."""
    writer = native.write_kv_cache()
    if writer is None:
        pytest.skip("the native kernels could not be built here")
    codes = torch.arange(256, dtype=torch.uint8).view(cache_dtype).float()
    grid = codes[torch.isfinite(codes)].unique()  # sorted, both signs
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32
    near = torch.cat([grid, mids, torch.nextafter(mids, torch.tensor(float("inf"))),
                      torch.nextafter(mids, torch.tensor(-float("inf")))])
    bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    values = torch.cat([near, bits.to(torch.int32).view(torch.float32)])
    values = values[: len(values) // 64 * 64].view(-1, 64)  # tokens x (2 kv heads x 32 dims)
    tokens = values.shape[0]
    shape = (-(-tokens // 16), 2, 16, 32)
    k_cache, v_cache = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    writer(values, values, k_cache, v_cache, torch.arange(tokens), False)
    stored = k_cache.view(torch.uint8).permute(0, 2, 1, 3).reshape(-1, 64)[:tokens]
    assert torch.equal(stored, kv_layout.to_cache_dtype(values, cache_dtype).view(torch.uint8))


@pytest.mark.parametrize("window", [None, 50])
def test_long_prefill_chunks_match_direct_computation(window, decode_path, make_attn_metadata):
    """Prompts over many blocks, chunked (the second chunk starts mid-block, after a context): the
    prefill kernels step their running softmax over several blocks of keys at a time."""
    layer = Attention(6, 2, 64, scale=64**-0.5, sliding_window=window)
    check_steps_against_reference(layer, 16, torch.bfloat16, 3e-2, [[150, 37, 80], [1, 70, 1], [1, 1, 1]],
                                  make_attn_metadata, device=decode_path)


@pytest.mark.parametrize("block", [32, 64])
@pytest.mark.parametrize("window", [None, 50])
def test_blocks_of_several_tiles_match_direct_computation(block, window, decode_path, make_attn_metadata):
    """Blocks of 32 and 64 keys (the CPU's default where the pairs layout does not run): the rows
    kernels read a block as tiles of 16 keys; chunks start inside blocks and inside tiles."""
    layer = Attention(6, 2, 64, scale=64**-0.5, sliding_window=window)
    check_steps_against_reference(layer, block, torch.bfloat16, 3e-2, [[150, 37, 80], [1, 70, 1], [1, 1, 1]],
                                  make_attn_metadata, device=decode_path)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_the_rows_prefill_kernel_takes_blocks_of_several_tiles(block):
    """(so that the test above runs it on the native path)"""
    if native.paged_prefill_attention_rows() is None:
        pytest.skip("the rows-layout kernels do not run here")
    cache = torch.zeros(4, 2, block, 64, dtype=torch.bfloat16)
    assert attention.prefill_kernel(cache, False, torch.bfloat16) is native.paged_prefill_attention_rows()


def test_query_rows_of_a_wider_tensor_match_direct_computation(decode_path, make_attn_metadata):
    """The queries as the model hands them over, a view of the fused projection's rows (row stride
    wider than the heads): the kernels read them in place."""
    layer = Attention(6, 2, 64, scale=64**-0.5)
    check_steps_against_reference(layer, 16, torch.bfloat16, 3e-2, [[40, 3, 21], [1, 30, 1]], make_attn_metadata,
                                  strided_queries=True, device=decode_path)


def check_steps_against_reference(layer, block, dtype, tol, steps, make_attn_metadata, strided_queries=False,
                                  cache_dtype=None, device="cpu"):
    """Run `steps` (each: the new tokens of every sequence) through `layer` over random block tables
    and a cache holding random leftovers, checking every output row against `reference`. With an
    fp8 `cache_dtype` the reference attends over the keys and values as that cache stores them.
    The layer runs on `device`; the reference, on the same values, on the CPU."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    cache_dtype = cache_dtype or dtype
    num_blocks = 40
    shape = (num_blocks, kv_heads, block, head_dim)
    # random (finite) leftovers in the cache, as blocks reused from finished sequences hold
    layer.kv_cache = (torch.randn(shape).to(device, cache_dtype), torch.randn(shape).to(device, cache_dtype))
    free = torch.randperm(num_blocks).tolist()
    num_seqs = len(steps[0])
    history_len = max(sum(step[i] for step in steps) for i in range(num_seqs))
    tables = [[free.pop() for _ in range(-(-history_len // block))] for _ in range(num_seqs)]
    history = [(torch.randn(history_len, kv_heads, head_dim).to(dtype),
                torch.randn(history_len, kv_heads, head_dim).to(dtype)) for _ in range(num_seqs)]
    stored = history
    if cache_dtype != dtype:
        for keys, values in history:  # values fp8 saturates, and values in its subnormal range
            keys[0, 0, :4], values[1, 0, :4] = 1e5, -1e5
            keys[2:4] *= 1e-4
            values[4:6] *= 1e-5
        stored = [tuple(kv_layout.to_cache_dtype(x, cache_dtype).to(dtype) for x in pair) for pair in history]
    computed = [0] * num_seqs
    for step_new in steps:
        md = make_attn_metadata(computed, step_new, tables, block, device=device)
        q = torch.randn(sum(step_new), heads, head_dim).to(dtype)
        k = torch.cat([history[i][0][c:c + n] for i, (c, n) in enumerate(zip(computed, step_new))])
        v = torch.cat([history[i][1][c:c + n] for i, (c, n) in enumerate(zip(computed, step_new))])
        q_rows = q.flatten(1)
        if strided_queries:  # the same values, each row followed by room for k and v
            q_rows = torch.cat([q_rows, torch.zeros(len(q), 2 * kv_heads * head_dim, dtype=dtype)], 1)
        q_rows = q_rows.to(device)[:, :heads * head_dim]
        with torch.inference_mode(), forward_context(md):
            out = layer(q_rows, k.flatten(1).to(device), v.flatten(1).to(device)).view(-1, heads, head_dim).cpu()
        row = 0
        for i, (c, n) in enumerate(zip(computed, step_new)):
            positions = torch.arange(c, c + n)
            expected = reference(q[row:row + n], stored[i][0][:c + n], stored[i][1][:c + n], positions,
                                 head_dim**-0.5, layer.sliding_window)
            torch.testing.assert_close(out[row:row + n].double(), expected, atol=tol, rtol=tol)
            row += n
        computed = [c + n for c, n in zip(computed, step_new)]
