"""The native decoder stack (model/native_stack.py) chains the module path's own kernels, so its logits
must be bitwise those of the modules for every step shape it takes: decode-only, prefill-only and
mixed batches in either order, with a sliding window, biases and Qwen3's q/k norms. Steps it cannot
take (a prefill over rows-layout caches, groups that are not contiguous rows) and models it cannot
run (float32, a layer with a forward of its own) must fall back to the modules, not fail."""

from __future__ import annotations

import pytest
import torch
import transformers

from kiln.config import LoadConfig, ModelConfig
from kiln.model import native_stack
from kiln.model.layers import native
from kiln.model.layers.cpu_gemm import pack_model_weights
from kiln.model.loader import load_model

# head_dim 32, so 16-key bfloat16 caches take a layout a native prefill kernel reads (pairs or rows)
TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
TOKENS = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(5)).tolist()

pytestmark = pytest.mark.skipif(native.decoder_stack() is None,
                                reason="the native decoder stack needs the kernels and AVX512-BF16 or AVX2")


def _save(tmp_path, family: str, **extra) -> str:
    torch.manual_seed(0)
    if family == "qwen2":  # q/k/v biases
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **extra))
    elif family == "qwen3":  # per-head q/k norms
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, head_dim=32, **extra))
    elif family == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=8, **extra))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, **extra))
    hf.save_pretrained(tmp_path)
    return str(tmp_path)


def _load(path: str, dtype: str = "bfloat16", enforce_eager: bool = False) -> torch.nn.Module:
    config = ModelConfig(model=path, tokenizer=path, dtype=dtype, max_model_len=256,
                         hf_config=transformers.AutoConfig.from_pretrained(path), served_model_name="t",
                         enforce_eager=enforce_eager)
    model = load_model(config, LoadConfig())
    pack_model_weights(model)
    return model


@pytest.fixture
def native_calls(monkeypatch):
    """How many steps the native stack ran (a None answer hands the step to the modules)."""
    calls: list[bool] = []
    call = native_stack.NativeDecoderStack.__call__

    def counting(self, hidden, cos, sin):
        out = call(self, hidden, cos, sin)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(native_stack.NativeDecoderStack, "__call__", counting)
    return calls


def _run(model, steps, block_size, make_kv_cache, run_step, cache_dtype=None) -> list[torch.Tensor]:
    cache = make_kv_cache(model, num_blocks=48, block_size=block_size, cache_dtype=cache_dtype)
    return [run_step(model, cache, step) for step in steps]


def _prefill_natively() -> bool:
    """A native prefill kernel reads 16-key bfloat16 caches here: the pairs-layout one (AVX512-BF16)
    or the rows-layout one (AVX2)."""
    return native.pairs_layout_available() or native.paged_prefill_attention_rows() is not None


def _modules_only(model) -> torch.nn.Module:
    model.model.native_stack = lambda: None
    return model


A, B, C = TOKENS
STEPS = [
    [(0, A[:9], 0), (1, B[:20], 0)],  # prefill only
    [(0, A[:10], 9), (1, B[:33], 20)],  # mixed, decode rows first
    [(1, B[:36], 33), (0, A[:11], 10)],  # mixed, prefill rows first
    [(0, A[:12], 11), (1, B[:37], 36)],  # decode only
    [(0, A[:13], 12), (1, B[:38], 37), (2, C[:5], 0)],  # mixed, a new prompt after the decodes
]


@pytest.mark.parametrize(("family", "extra"), [
    ("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
])
def test_native_stack_gives_bitwise_the_module_logits(family, extra, tmp_path, make_kv_cache, run_step,
                                                      native_calls):
    path = _save(tmp_path, family, **extra)
    fused, modules = _load(path), _modules_only(_load(path))
    got = _run(fused, STEPS, 16, make_kv_cache, run_step)
    # every step ran natively (without a native prefill kernel, only the decode-only step would)
    assert native_calls == [_prefill_natively() or step is STEPS[3] for step in STEPS]
    expected = _run(modules, STEPS, 16, make_kv_cache, run_step)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"step {step} differs"


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_native_stack_over_fp8_caches_gives_bitwise_the_module_logits(family, cache_dtype, tmp_path, make_kv_cache,
                                                                      run_step, native_calls):
    """fp8 caches (--kv-cache-dtype fp8): the stack writes and reads them with the modules' own kernels."""
    path = _save(tmp_path, family)
    fused, modules = _load(path), _modules_only(_load(path))
    got = _run(fused, STEPS, 16, make_kv_cache, run_step, cache_dtype)
    assert native_calls == [_prefill_natively() or step is STEPS[3] for step in STEPS]
    expected = _run(modules, STEPS, 16, make_kv_cache, run_step, cache_dtype)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g, e), f"step {step} differs"


def test_steps_the_stack_cannot_take_run_the_modules(tmp_path, make_kv_cache, run_step, native_calls):
    path = _save(tmp_path, "llama")
    fused, modules = _load(path), _modules_only(_load(path))
    # rows-layout caches (4-key blocks): decodes run natively, a prefill falls back to the modules
    steps = STEPS[:2] + [[(0, A[:11], 10), (1, B[:34], 33)]]
    got = _run(fused, steps, 4, make_kv_cache, run_step)
    assert native_calls == [False, False, True]
    for g, e in zip(got, _run(modules, steps, 4, make_kv_cache, run_step)):
        assert torch.equal(g, e)
    # decode rows split by a prefill chunk: not contiguous rows, so modules
    native_calls.clear()
    steps = [STEPS[0], [(0, A[:10], 9), (1, B[:21], 20), (2, C[:5], 0)],
             [(0, A[:11], 10), (2, C[:9], 5), (1, B[:22], 21)]]
    got = _run(fused, steps, 16, make_kv_cache, run_step)
    assert native_calls == [_prefill_natively(), _prefill_natively(), False]
    for g, e in zip(got, _run(modules, steps, 16, make_kv_cache, run_step)):
        assert torch.equal(g, e)


def test_float32_models_keep_the_modules(tmp_path, make_kv_cache):
    model = _load(_save(tmp_path, "llama"), "float32")  # no packed weights
    make_kv_cache(model, num_blocks=8, block_size=16)
    assert model.model.native_stack() is None


def test_a_layer_with_a_forward_of_its_own_keeps_the_modules(tmp_path, make_kv_cache, monkeypatch):
    model = _load(_save(tmp_path, "llama"))
    make_kv_cache(model, num_blocks=8, block_size=16)
    layer = model.model.layers[1]
    base = type(layer)

    def forward(self, *args):  # a subclass's own forward, even one that defers to the base
        return base.forward(self, *args)

    monkeypatch.setattr(layer, "__class__", type("Custom", (base,), {"forward": forward}))
    assert layer.native_weights() is None
    assert model.model.native_stack() is None


def test_enforce_eager_keeps_the_modules(tmp_path, make_kv_cache):
    model = _load(_save(tmp_path, "llama"), enforce_eager=True)
    make_kv_cache(model, num_blocks=8, block_size=16)
    assert model.model.native_stack() is None


def test_the_stack_follows_the_cache_binding(tmp_path, make_kv_cache):
    model = _load(_save(tmp_path, "llama"))
    assert model.model.native_stack() is None  # no caches bound yet
    make_kv_cache(model, num_blocks=8, block_size=16)
    first = model.model.native_stack()
    assert first is not None and first.pairs_layout == native.pairs_layout_available()
    assert model.model.native_stack() is first  # decided once per binding
    make_kv_cache(model, num_blocks=8, block_size=4)
    second = model.model.native_stack()
    assert second is not first and not second.pairs_layout
    assert second.k_caches[0] is model.model.layers[0].self_attn.attn.kv_cache[0]
