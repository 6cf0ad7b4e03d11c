"""GPU: real transformers model classes running on the kernels, against their eager attention.

Bound (every comparison): with the fp32 eager model as the reference, the relative error
||x - ref|| / ||ref|| of the bf16 flash-attn-t model's logits (and of its parameter gradients) is
at most 2x that of the bf16 eager model, plus 1e-3. Forms that must agree with each other
(padded / packed / one sequence at a time) are held to the same bound.
"""
import pytest
import torch

from conftest import GPU
from hf_models import VOCAB, build, gemma2_config, gpt_oss_config, llama_config, mistral_config, qwen2_config

from flash_attn_t.integrations import transformers as integration
from flash_attn_t.integrations.transformers import ATTN_IMPLEMENTATION

pytestmark = GPU


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def models(kind, config):
    """fp32 eager (the reference), bf16 eager and bf16 flash-attn-t, all with the same weights."""
    ref = build(kind, config, "eager").cuda()
    eager = build(kind, config, "eager", state_dict=ref.state_dict()).to("cuda", torch.bfloat16)
    ours = build(kind, config, ATTN_IMPLEMENTATION, state_dict=ref.state_dict()).to("cuda", torch.bfloat16)
    return ref, eager, ours


@pytest.fixture
def kernels_only(monkeypatch):
    """Fails the test if any attention call takes the fallback path."""
    def no_fallback(*args, **kwargs):
        raise AssertionError("the fallback path ran where the kernels should have")

    monkeypatch.setattr(integration, "fallback_attention", no_fallback)


def assert_within_bound(ours, eager, ref, what):
    bound = 2 * rel_err(eager, ref) + 1e-3
    assert rel_err(ours, ref) <= bound, f"{what}: {rel_err(ours, ref):.2e} > {bound:.2e}"


def grads(model):
    return torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])


def test_llama_gqa_logits_and_gradients(kernels_only):
    ref, eager, ours = models("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 200), device="cuda")
    outputs = []
    for model in (ref, eager, ours):
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        outputs.append(out.logits)
    assert_within_bound(outputs[2], outputs[1], outputs[0], "logits")
    assert_within_bound(grads(ours), grads(eager), grads(ref), "parameter gradients")


def test_llama_fp32_weights_under_bf16_autocast(kernels_only):
    ref = build("llama", llama_config(), "eager").cuda()
    ours = build("llama", llama_config(), ATTN_IMPLEMENTATION, state_dict=ref.state_dict()).cuda()
    ids = torch.randint(0, VOCAB, (2, 130), device="cuda")
    expected = ref(ids).logits
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, eager_autocast = ours(ids).logits, ref(ids).logits
    assert_within_bound(got, eager_autocast, expected, "logits")


def test_padded_batch_matches_each_sequence_alone_and_eager(kernels_only):
    ref, eager, ours = models("llama", llama_config())
    lengths = (150, 97, 1)
    ids = torch.randint(0, VOCAB, (3, 150), device="cuda")
    mask = torch.zeros(3, 150, dtype=torch.long, device="cuda")
    for row, n in enumerate(lengths):
        mask[row, 150 - n:] = 1  # left padding, as for generation
    padded = ours(ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        alone = ours(ids[row:row + 1, 150 - n:]).logits[0]
        expected = ref(ids[row:row + 1, 150 - n:]).logits[0]
        eager_alone = eager(ids[row:row + 1, 150 - n:]).logits[0]
        assert_within_bound(padded[row, 150 - n:], eager_alone, expected, f"padded row {row}")
        assert_within_bound(alone, eager_alone, expected, f"sequence {row} alone")
    keep = mask.bool()
    assert_within_bound(padded[keep], eager(ids, attention_mask=mask).logits[keep],
                        ref(ids, attention_mask=mask).logits[keep], "padded batch")


def test_packed_sequences_match_separate_ones(kernels_only):
    ref, eager, ours = models("llama", llama_config())
    lengths = (70, 1, 129)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), device="cuda")
    position_ids = torch.cat([torch.arange(n, device="cuda") for n in lengths])[None]
    cu = torch.tensor([0, 70, 71, 200], dtype=torch.int32, device="cuda")
    by_position_ids = ours(ids, position_ids=position_ids).logits
    by_cu_seqlens = ours(ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=129,
                         max_length_k=129).logits
    separate = lambda model: torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)  # noqa: E731
    expected, eager_separate = separate(ref), separate(eager)
    for got, what in ((by_position_ids, "position_ids"), (by_cu_seqlens, "cu_seq_lens"), (separate(ours), "separate")):
        assert_within_bound(got, eager_separate, expected, what)


# generate's cache: transformers' default DynamicCache (the keys grow each step), a StaticCache
# (every slot handed over, the mask saying which are filled) run eagerly, and a StaticCache with the
# forward compiled (transformers' auto-compile, mode "reduce-overhead")
CACHES = {"dynamic": {}, "static": dict(cache_implementation="static", disable_compile=True),
          "static_compiled": dict(cache_implementation="static")}
GENERATION_CASES = [("llama", "dynamic"), ("qwen2", "dynamic"), ("llama", "static"), ("qwen2", "static"),
                    ("llama", "static_compiled")]  # one compiled model: compiling costs ~30 s


@pytest.mark.parametrize("kind, cache", GENERATION_CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_runs_on_the_kernels_within_the_bound_at_every_step(kernels_only, kind, cache, padded):
    """model.generate (a prefill, then one-token steps against the cache) on the kernels: at each
    of 64 steps our logits are within the bound of the fp32 eager model's on the same tokens
    (teacher-forced: a bf16 near-tie may pick another token than eager would, so the tokens
    themselves are compared only through the logits that chose them)."""
    torch._dynamo.reset()
    ref, eager, ours = models(kind, {"llama": llama_config, "qwen2": qwen2_config}[kind]())
    prompt_len, new = 20, 64
    ids = torch.randint(0, VOCAB, (2, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :7] = 0  # left padding, as batched generation uses
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        return_dict_in_generate=True, output_logits=True, pad_token_id=0, **CACHES[cache])
    assert out.sequences.shape == (2, prompt_len + new)
    steps = torch.stack(out.logits, dim=1)  # (batch, new, vocab)
    assert torch.equal(out.sequences[:, prompt_len:], steps.argmax(-1))
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype, device="cuda")], dim=1)
    window = slice(prompt_len - 1, prompt_len - 1 + new)  # the positions whose logits chose each new token
    expected = ref(out.sequences, attention_mask=full_mask).logits[:, window]
    eager_steps = eager(out.sequences, attention_mask=full_mask).logits[:, window]
    for t in range(new):
        assert_within_bound(steps[:, t], eager_steps[:, t], expected[:, t], f"step {t}")


def test_training_with_attention_dropout_runs_on_the_kernels(kernels_only):
    """attention_dropout > 0 in train mode reaches the kernels as dropout_p (no fallback): the loss
    and gradients are finite, torch.manual_seed reproduces the loss, another seed draws another
    mask, and in eval mode no dropout applies (the result matches eager's within the bound)."""
    config = llama_config()
    config.attention_dropout = 0.1
    ref, eager, ours = models("llama", config)
    ids = torch.randint(0, VOCAB, (2, 130), device="cuda")
    ours.train()

    def loss(seed):
        torch.manual_seed(seed)
        ours.zero_grad()
        out = ours(ids, labels=ids)
        out.loss.backward()
        return out.loss.detach()

    first, again, other = loss(0), loss(0), loss(1)
    assert torch.isfinite(first) and torch.isfinite(grads(ours)).all()
    assert torch.equal(first, again) and not torch.equal(first, other)
    for model in (ref, eager, ours):
        model.eval()
    with torch.no_grad():
        assert_within_bound(ours(ids).logits, eager(ids).logits, ref(ids).logits, "eval logits")


def test_mistral_window_longer_than_the_keys_runs_on_the_kernels(kernels_only):
    ref, eager, ours = models("mistral", mistral_config(sliding_window=256))
    ids = torch.randint(0, VOCAB, (2, 160), device="cuda")
    assert_within_bound(ours(ids).logits, eager(ids).logits, ref(ids).logits, "logits")


def test_mistral_sliding_window_runs_on_the_kernels(kernels_only):
    """A window shorter than the sequence: the kernels' window, plain and left-padded batches."""
    ref, eager, ours = models("mistral", mistral_config(sliding_window=32))
    ids = torch.randint(0, VOCAB, (2, 160), device="cuda")
    assert_within_bound(ours(ids).logits, eager(ids).logits, ref(ids).logits, "logits")
    mask = torch.ones(2, 160, dtype=torch.long, device="cuda")
    mask[1, :23] = 0
    keep = mask.bool()
    assert_within_bound(ours(ids, attention_mask=mask).logits[keep], eager(ids, attention_mask=mask).logits[keep],
                        ref(ids, attention_mask=mask).logits[keep], "padded logits")


@pytest.mark.parametrize("kind, config", [("gemma2", gemma2_config())])
def test_gemma2_softcap_and_window_run_on_the_kernels(kernels_only, kind, config):
    """Gemma 2: logit soft-capping and alternating sliding-window layers, on the kernels (no
    fallback), padded batch, logits within the bound of the fp32 eager model."""
    ref, eager, ours = models(kind, config)
    ids = torch.randint(0, VOCAB, (2, 100), device="cuda")
    mask = torch.ones(2, 100, dtype=torch.long, device="cuda")
    mask[1, :9] = 0
    keep = mask.bool()
    assert_within_bound(ours(ids, attention_mask=mask).logits[keep], eager(ids, attention_mask=mask).logits[keep],
                        ref(ids, attention_mask=mask).logits[keep], "logits")
    assert_within_bound(ours(ids).logits, eager(ids).logits, ref(ids).logits, "logits, no padding")


def test_gpt_oss_sinks_run_on_the_kernels(kernels_only):
    """gpt-oss: attention sinks (s_aux) as the kernels' learnable_sink, with its sliding-window
    layers, no fallback: logits and the sinks' gradients within the bound of the fp32 eager model."""
    ref, eager, ours = models("gpt_oss", gpt_oss_config())
    with torch.no_grad():  # sinks start at zero: make them matter
        for model in (ref, eager, ours):
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    ids = torch.randint(0, VOCAB, (2, 100), device="cuda")
    logits = [model(ids).logits for model in (ours, eager, ref)]
    assert_within_bound(*logits, "logits")
    for x in logits:
        x.float().square().mean().backward()
    for layers in zip(*(model.model.layers for model in (ours, eager, ref))):
        grads = [layer.self_attn.sinks.grad for layer in layers]
        assert_within_bound(*grads, "sinks' gradient")


def test_attention_call_compiles_fullgraph(kernels_only):
    torch._dynamo.reset()
    _, _, ours = models("llama", llama_config())
    attn = ours.model.layers[0].self_attn
    q = torch.randn(2, 8, 100, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def call(q, k, v):
        return integration.attention_forward(attn, q, k, v, None, scaling=0.125)[0]

    torch.testing.assert_close(torch.compile(call, fullgraph=True)(q, k, v), call(q, k, v))


def test_compiled_model_forward_backward_matches_eager_mode(kernels_only):
    torch._dynamo.reset()
    ref, eager, ours = models("llama", llama_config())
    ids = torch.randint(0, VOCAB, (2, 128), device="cuda")
    ours.train()
    compiled = torch.compile(ours)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    compiled_grads = grads(ours)
    ours.zero_grad()
    eager_mode_loss = ours(ids, labels=ids).loss
    eager_mode_loss.backward()
    torch.testing.assert_close(loss, eager_mode_loss, rtol=2e-2, atol=2e-2)
    assert rel_err(compiled_grads, grads(ours)) < 2e-2
