"""CPU: the transformers integration's registration, patching and fallback path (on the CPU every
call falls back, so these check that the fallback is exact against the models' eager attention)."""
import warnings

import pytest
import torch

from hf_models import VOCAB, build, gemma2_config, gpt_oss_config, llama_config, mistral_config, pair, transformers

import flash_attn_t
from flash_attn_t.integrations import transformers as integration
from flash_attn_t.integrations.transformers import ATTN_IMPLEMENTATION


@pytest.fixture(autouse=True)
def clean_state():
    integration.unpatch_transformers()
    yield
    integration.unpatch_transformers()


def registered():
    return ATTN_IMPLEMENTATION in transformers.modeling_utils.AttentionInterface._global_mapping


def test_name_is_not_taken_for_a_transformers_flash_path():
    assert "flash" not in ATTN_IMPLEMENTATION


def test_register_makes_the_name_valid_and_unpatch_removes_it():
    with pytest.raises(ValueError):
        build("llama", llama_config(), ATTN_IMPLEMENTATION + "_unknown")
    model = build("llama", llama_config(), ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert registered()
    assert ATTN_IMPLEMENTATION in transformers.masking_utils.AttentionMaskInterface._global_mapping
    integration.unpatch_transformers()
    assert not registered()
    assert ATTN_IMPLEMENTATION not in transformers.masking_utils.AttentionMaskInterface._global_mapping


def test_patch_model_switches_and_unpatch_restores():
    model = build("llama", llama_config(), "sdpa")
    keys = list(model.state_dict())
    assert flash_attn_t.patch_transformers(model) is model
    flash_attn_t.patch_transformers(model)  # idempotent
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert list(model.state_dict()) == keys
    flash_attn_t.unpatch_transformers()
    assert model.config._attn_implementation == "sdpa"
    assert not registered()


def test_patch_finds_the_model_inside_a_wrapper():
    class Wrapper(torch.nn.Module):  # the shape of a PEFT wrapper: the PreTrainedModel is a child
        def __init__(self, inner):
            super().__init__()
            self.base_model = inner

    model = build("llama", llama_config(), "eager")
    flash_attn_t.patch_transformers(Wrapper(model))
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    flash_attn_t.unpatch_transformers()
    assert model.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="PreTrainedModel"):
        flash_attn_t.patch_transformers(torch.nn.Linear(2, 2))


def test_global_patch_switches_new_models_except_explicit_eager():
    original = transformers.modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation
    flash_attn_t.patch_transformers()
    flash_attn_t.patch_transformers()  # idempotent
    for requested in (None, "sdpa", "flash_attention_2"):
        assert build("llama", llama_config(), requested).config._attn_implementation == ATTN_IMPLEMENTATION
    assert build("llama", llama_config(), "eager").config._attn_implementation == "eager"
    flash_attn_t.unpatch_transformers()
    assert transformers.modeling_utils.PreTrainedModel._check_and_adjust_attn_implementation is original
    assert build("llama", llama_config(), "sdpa").config._attn_implementation == "sdpa"


def test_patched_context_manager_restores_on_error():
    model = build("llama", llama_config(), "sdpa")
    with pytest.raises(RuntimeError, match="inside"):
        with flash_attn_t.patched(model):
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
    assert not registered()


def test_padding_mask_function():
    full = torch.ones(2, 6, dtype=torch.bool)
    assert integration.padding_mask(kv_length=6, attention_mask=full) is None
    padded = full.clone()
    padded[1, :2] = False
    assert integration.padding_mask(kv_length=6, attention_mask=padded).reshape(2, 2).tolist() == [[0, 6], [2, 6]]
    assert integration.padding_mask(kv_length=4, attention_mask=padded) is None  # the padding is left of the keys
    padded[0, 4] = False
    assert torch.equal(integration.padding_mask(kv_length=4, attention_mask=padded), padded[:, -4:])


def assert_logits_match(eager, ours, ids, **inputs):
    expected = eager(ids, **inputs).logits
    got = ours(ids, **inputs).logits
    mask = inputs.get("attention_mask")
    keep = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, config", [("llama", llama_config()), ("mistral", mistral_config(8)),
                                          ("gemma2", gemma2_config())])
def test_fallback_matches_eager_with_padding(kind, config):
    eager, ours = pair(kind, config)
    ids = torch.randint(0, VOCAB, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, 19:] = 0  # right padding
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_logits_match(eager, ours, ids)
        assert_logits_match(eager, ours, ids, attention_mask=mask)


def test_fallback_packed_position_ids_match_separate_sequences():
    eager, ours = pair("llama", llama_config())
    lengths = (7, 1, 12)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = ours(ids, position_ids=position_ids).logits
    separate = torch.cat([eager(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-4)


def test_fallback_warns_once_per_reason():
    integration._warned.clear()
    _, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (1, 8))
    with pytest.warns(UserWarning, match="fallback path"):
        ours(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(ids)


def test_fallback_gradients_with_gradient_checkpointing_match_eager():
    eager, ours = pair("llama", llama_config())
    for model in (eager, ours):
        model.gradient_checkpointing_enable()
        model.train()
    ids = torch.randint(0, VOCAB, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [model(ids, labels=ids).loss for model in (eager, ours)]
    for loss in losses:
        loss.backward()
    for (name, p_eager), (_, p_ours) in zip(eager.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("call, words", [
    (dict(output_attentions=True), "output_attentions"),
    (dict(attention_mask=torch.zeros(1, 1, 16, 16)), "4-d attention mask"),
    (dict(head_dim=264), "head dim 264"),
    (dict(dtype=torch.float32), "float32"),
    (dict(), "cpu"),
])
def test_unsupported_reason_names_the_feature(call, words):
    head_dim, dtype = call.pop("head_dim", 64), call.pop("dtype", torch.bfloat16)
    q, k = torch.randn(1, 8, 16, head_dim, dtype=dtype), torch.randn(1, 2, 16, head_dim, dtype=dtype)
    reason = integration.unsupported_reason(q, k, call.pop("attention_mask", None), call.pop("dropout", 0.0),
                                            call.pop("sliding_window", None), call.pop("softcap", None), call)
    assert words in reason


@pytest.mark.parametrize("feature, call, check_kwargs", [
    ("dropout", dict(dropout=0.1), dict(dropout_p=0.1)),
])
def test_one_feature_table_decides_for_the_api_and_the_integration(monkeypatch, feature, call, check_kwargs):
    """interface.KERNEL_FEATURES is what both the argument checks and the fallback decision read:
    an entry turned off stops the call in both, turned on lets it through both (the CPU inputs then
    name the device instead)."""
    from flash_attn_t import interface
    q, k = torch.randn(1, 8, 16, 64, dtype=torch.bfloat16), torch.randn(1, 2, 16, 64, dtype=torch.bfloat16)

    def reason():
        return integration.unsupported_reason(q, k, None, call.get("dropout", 0.0), call.get("sliding_window"),
                                              call.get("softcap"), {})

    monkeypatch.setitem(interface.KERNEL_FEATURES, feature, False)
    with pytest.raises(NotImplementedError):
        interface.check_unimplemented(**check_kwargs)
    assert "not implemented in the kernels" in reason()
    monkeypatch.setitem(interface.KERNEL_FEATURES, feature, True)
    interface.check_unimplemented(**check_kwargs)
    assert "cpu" in reason()


def test_sliding_window_as_long_as_the_keys_is_no_window():
    q, k = torch.randn(1, 8, 16, 64), torch.randn(1, 2, 16, 64)
    reason = integration.unsupported_reason(q, k, None, 0.0, 16, None, {})
    assert "window" not in reason


@pytest.fixture
def reference_kernels(monkeypatch):
    """The kernel path on the CPU: the flash_attn functions replaced by the exact reference, so the
    integration's own unpadding, packing and padding back are what is tested."""
    from flash_attn_t.reference import attention_reference

    def batched(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, learnable_sink=None,
                dropout_p=0.0):
        assert dropout_p == 0.0  # these models run in eval mode
        return attention_reference(q, k, v, softmax_scale, causal, compute_dtype=q.dtype, window_size=window_size,
                                   softcap=softcap, sinks=learnable_sink)[0]

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False,
               window_size=(-1, -1), softcap=0.0, learnable_sink=None, dropout_p=0.0):
        assert dropout_p == 0.0
        lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
        assert max_seqlen_q == lengths_q.max() and max_seqlen_k == lengths_k.max()
        return attention_reference(q, k, v, softmax_scale, causal, compute_dtype=q.dtype, cu_seqlens_q=cu_seqlens_q,
                                   cu_seqlens_k=cu_seqlens_k, window_size=window_size, softcap=softcap,
                                   sinks=learnable_sink)[0]

    def kvcache(q, k_cache, v_cache, cache_seqlens, cache_leftpad, softmax_scale=None, causal=False,
                window_size=(-1, -1), softcap=0.0, learnable_sink=None):
        outs = []
        for b, (first, end) in enumerate(zip(cache_leftpad.tolist(), cache_seqlens.tolist())):
            keys = slice(first, end)
            outs.append(batched(q[b:b + 1], k_cache[b:b + 1, keys], v_cache[b:b + 1, keys], softmax_scale, causal,
                                window_size, softcap, learnable_sink))
        return torch.cat(outs)

    def fail(*args, **kwargs):
        raise AssertionError("the fallback path ran where the kernel path should have")

    monkeypatch.setattr(integration, "unsupported_reason", lambda *args: None)
    monkeypatch.setattr(integration, "flash_attn_func", batched)
    monkeypatch.setattr(integration, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(integration, "flash_attn_with_kvcache", kvcache)
    monkeypatch.setattr(integration, "fallback_attention", fail)


def test_kernel_path_sliding_window_is_exact(reference_kernels):
    """transformers' sliding window reaches the kernels as window_size (window - 1, -1): plain and
    left-padded batches against the model's eager attention (whose softmax runs in fp32, hence the
    tolerance); a window off by one key would move the logits far more than that."""
    eager, ours = pair("mistral", mistral_config(sliding_window=8))
    ids = torch.randint(0, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    assert_logits_match(eager, ours, ids)
    assert_logits_match(eager, ours, ids, attention_mask=mask)
    _, wider = pair("mistral", mistral_config(sliding_window=9))
    wider.load_state_dict(eager.state_dict())
    assert (wider(ids).logits - eager(ids).logits).abs().max() > 1e-2


def test_kernel_path_gemma2_softcap_is_exact(reference_kernels, monkeypatch):
    """Gemma 2's attn_logit_softcapping reaches the kernels as softcap (with its alternating
    sliding-window layers): plain and left-padded batches against the model's eager attention,
    and every kernel call got the model's cap."""
    eager, ours = pair("gemma2", gemma2_config())
    ids = torch.randint(0, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    seen = []
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        kernel = getattr(integration, name)
        monkeypatch.setattr(integration, name, lambda *a, _kernel=kernel, **kw: seen.append(kw["softcap"]) or
                            _kernel(*a, **kw))
    assert_logits_match(eager, ours, ids)
    assert_logits_match(eager, ours, ids, attention_mask=mask)
    assert seen and set(seen) == {gemma2_config().attn_logit_softcapping}


def test_kernel_path_gpt_oss_sinks_are_exact(reference_kernels, monkeypatch):
    """gpt-oss's attention sinks (s_aux) reach the kernels as learnable_sink, with its alternating
    sliding-window layers: plain and left-padded batches against the model's eager attention, the
    sinks' gradients too; every kernel call got the layer's sinks."""
    eager, ours = pair("gpt_oss", gpt_oss_config())
    with torch.no_grad():  # sinks start at zero: make them matter
        for model in (eager, ours):
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    seen = []
    for name in ("flash_attn_func", "flash_attn_varlen_func"):
        kernel = getattr(integration, name)
        monkeypatch.setattr(integration, name, lambda *a, _kernel=kernel, **kw: seen.append(kw["learnable_sink"]) or
                            _kernel(*a, **kw))
    ids = torch.randint(0, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    assert_logits_match(eager, ours, ids)
    assert_logits_match(eager, ours, ids, attention_mask=mask)
    assert seen and all(sink is not None for sink in seen)
    for model in (eager, ours):
        model(ids).logits.square().mean().backward()
    for layer_eager, layer_ours in zip(eager.model.layers, ours.model.layers):
        torch.testing.assert_close(layer_ours.self_attn.sinks.grad, layer_eager.self_attn.sinks.grad, rtol=1e-4,
                                   atol=1e-6)


def test_kernel_path_padding_and_packing_are_exact(reference_kernels):
    eager, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, 1:] = 0  # right padding down to one token
    assert_logits_match(eager, ours, ids)
    assert_logits_match(eager, ours, ids, attention_mask=mask)
    lengths = (5, 1, 9)
    packed_ids = ids[:1, :sum(lengths)]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    separate = torch.cat([eager(part).logits for part in packed_ids.split(lengths, dim=1)], dim=1)
    for kwargs in (dict(position_ids=position_ids),
                   dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                        max_length_k=9)):
        torch.testing.assert_close(ours(packed_ids, **kwargs).logits, separate, rtol=1e-4, atol=1e-4)


# generate's cache: DynamicCache, and a StaticCache (every slot reaches the attention function, the
# 2-d mask only the filled ones)
CACHES = {"dynamic": {}, "static": dict(cache_implementation="static", disable_compile=True)}


@pytest.mark.parametrize("cache", list(CACHES))
def test_kernel_path_generation_with_a_cache_matches_eager(reference_kernels, cache):
    eager, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    generated = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **CACHES[cache])
                 for model in (eager, ours)]
    assert torch.equal(generated[0], generated[1])


def test_left_padded_masks_become_key_ranges_others_stay_masks():
    """Left padding then keys (generate's masks, a StaticCache's shorter than kv_length) become
    [first, end) key ranges; a mask with a hole or right padding stays a mask; no padding: None."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    ranges = integration.padding_mask(kv_length=8, attention_mask=mask)
    assert ranges.dtype == torch.int32 and ranges.reshape(3, 2).tolist() == [[2, 5], [0, 5], [5, 5]]
    # the firsts and the ends are the kernels' cache_leftpad / cache_seqlens as they are (no copy per layer)
    assert ranges[:, 0, 0, 0].is_contiguous() and ranges[:, 0, 0, 1].is_contiguous()
    assert integration.padding_mask(kv_length=8, attention_mask=ranges) is ranges  # handed back as it is
    holed = torch.tensor([[1, 0, 1, 1, 1]])
    got = integration.padding_mask(kv_length=8, attention_mask=holed)
    assert got.dtype == torch.bool and got.tolist() == [[True, False, True, True, True]]
    full = integration.padding_mask(kv_length=5, attention_mask=mask)
    assert full.dtype == torch.int32 and full.reshape(3, 2).tolist() == [[2, 5], [0, 5], [5, 5]]
    right = torch.tensor([[1, 1, 1, 0, 0]])
    assert torch.equal(integration.padding_mask(kv_length=5, attention_mask=right), right.bool())
    assert integration.padding_mask(kv_length=5, attention_mask=torch.ones(2, 5)) is None


def test_kernel_path_static_cache_with_a_hole_in_the_mask_matches_eager(reference_kernels):
    eager, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 2] = 0  # a masked token inside the prompt: not left padding
    generated = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **CACHES["static"])
                 for model in (eager, ours)]
    assert torch.equal(generated[0], generated[1])


def test_fallback_generation_with_a_static_cache_matches_eager():
    eager, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    generated = [model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **CACHES["static"])
                 for model in (eager, ours)]
    assert torch.equal(generated[0], generated[1])


def test_kernel_path_gradients_with_gradient_checkpointing_match_eager(reference_kernels):
    eager, ours = pair("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0
    # The loss reads position t's logits for label t + 1: leave out labels whose previous position is
    # padding (a padded query row's output is undefined: eager averages, the kernels give zeros).
    labels = ids.masked_fill(torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0, -100)
    for model in (eager, ours):
        model.gradient_checkpointing_enable()
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p_eager), (_, p_ours) in zip(eager.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_eager.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_generation_benchmark_runs_on_cpu():
    """benchmarks/generate_hf.py's logic with eager and SDPA on the CPU (its timings mean nothing there)."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "generate_hf.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/ is not beside tests/ (an installed-package test run)")
    result = subprocess.run([sys.executable, script, "--device", "cpu", "--backends", "eager", "sdpa", "--layers", "1",
                             "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate",
                             "128", "--vocab", "128", "--prompt", "16", "--new-tokens", "4", "--batch", "2", "--reps",
                             "1", "--caches", "dynamic", "static"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["2"]]
    assert [row[1:3] for row in rows] == [["dynamic", "eager"], ["dynamic", "sdpa"], ["static", "eager"],
                                          ["static", "sdpa"]]
    assert all(row[-1].endswith("%") for row in rows)
