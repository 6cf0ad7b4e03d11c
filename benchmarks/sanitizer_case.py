"""A small forward + backward through every kernel (both dtypes, both head dims, each mask variant:
plain, causal, sliding window with and without causal; softcap; ALiBi; a learnable sink; GQA,
ragged lengths, varlen, deterministic),
a KV-cache step (append, cache_batch_idx, cache_leftpad, one index value out of range), a
split-KV decode step and a paged one; head dim 256 fixed and varlen; dropout fixed and varlen;
sized for compute-sanitizer."""
import torch

from flash_attn_t import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    for head_dim in (64, 128):
        for causal, window, softcap, alibi in (
                (False, (-1, -1), 0.0, False), (True, (-1, -1), 0.0, False), (False, (33, 7), 0.0, False),
                (True, (40, -1), 0.0, False), (False, (-1, -1), 20.0, False), (True, (40, -1), 20.0, False),
                (False, (-1, -1), 0.0, True), (True, (-1, -1), 0.0, True), (False, (33, 7), 0.0, True)):
            slopes = torch.rand(4, device="cuda") if alibi else None
            varlen_slopes = torch.rand(3, 4, device="cuda") if alibi else None
            sink = torch.randn(4, device="cuda", requires_grad=True) if causal else None
            q = torch.randn(2, 77, 4, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(2, 131, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            v = torch.randn(2, 131, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            out = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, deterministic=causal,
                                  alibi_slopes=slopes, learnable_sink=sink)
            out.sum().backward()
            lens_q, lens_k = [0, 1, 70], [5, 0, 140]
            cu_q = torch.tensor([0, 0, 1, 71], device="cuda", dtype=torch.int32)
            cu_k = torch.tensor([0, 5, 5, 145], device="cuda", dtype=torch.int32)
            qv = torch.randn(71, 4, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            kv = torch.randn(145, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            vv = torch.randn(145, 2, head_dim, device="cuda", dtype=dtype, requires_grad=True)
            out = flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         window_size=window, softcap=softcap, alibi_slopes=varlen_slopes)
            out.sum().backward()
            k_cache = torch.randn(3, 200, 2, head_dim, device="cuda", dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            new_k, new_v = (torch.randn(2, 3, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2))
            flash_attn_with_kvcache(q[:, :3].detach(), k_cache, v_cache, new_k, new_v, causal=causal,
                                    cache_seqlens=torch.tensor([0, 150], device="cuda", dtype=torch.int32),
                                    cache_batch_idx=torch.tensor([2, 7], device="cuda", dtype=torch.int32),
                                    cache_leftpad=torch.tensor([0, 20], device="cuda", dtype=torch.int32),
                                    alibi_slopes=slopes)
            flash_attn_with_kvcache(q[:, :1].detach(), k_cache[:2], v_cache[:2], num_splits=3,  # split-KV decode
                                    cache_seqlens=torch.tensor([190, 7], device="cuda", dtype=torch.int32))
            pages = [torch.randn(30, 16, 2, head_dim, device="cuda", dtype=dtype) for _ in range(2)]  # page 16
            table = torch.tensor([[29, 3, 7, 1, 0, 2, 9, 4, 5, 6, 8, 10], list(range(11, 23))], device="cuda",
                                 dtype=torch.int32)
            flash_attn_with_kvcache(q[:, :1].detach(), *pages, num_splits=3, block_table=table,
                                    cache_seqlens=torch.tensor([190, 7], device="cuda", dtype=torch.int32))
            with torch.no_grad():  # a paged prefill: varlen q against 0 and 140 keys in pages
                flash_attn_varlen_func(qv.detach(), *pages, cu_q[1:], cu_k[1:] - 5, 70, 140,
                                       causal=causal, window_size=window, block_table=table)
for causal in (False, True):  # head dim 256 (its own kernels), fixed and varlen, GQA
    q = torch.randn(2, 77, 4, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 131, 2, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    flash_attn_func(q, k, v, causal=causal, deterministic=causal).sum().backward()
    qv = q.detach()[0, :71].clone().requires_grad_()
    kv, vv = (t.detach().flatten(0, 1)[:145].clone().requires_grad_() for t in (k, v))
    flash_attn_varlen_func(qv, kv, vv, torch.tensor([0, 0, 1, 71], device="cuda", dtype=torch.int32),
                           torch.tensor([0, 5, 5, 145], device="cuda", dtype=torch.int32), 70, 140,
                           causal=causal).sum().backward()
for causal in (False, True):  # dropout, fixed and varlen, head dims 64 (sm90 backward) and 256 (sm80)
    for head_dim in (64, 256):
        q = torch.randn(2, 77, 4, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
        k, v = (torch.randn(2, 131, 2, head_dim, device="cuda", dtype=torch.float16, requires_grad=True)
                for _ in range(2))
        flash_attn_func(q, k, v, dropout_p=0.2, causal=causal).sum().backward()
    qv, kv, vv = (t.detach().flatten(0, 1)[:n].clone().requires_grad_() for t, n in ((q, 71), (k, 145), (v, 145)))
    flash_attn_varlen_func(qv, kv, vv, torch.tensor([0, 0, 1, 71], device="cuda", dtype=torch.int32),
                           torch.tensor([0, 5, 5, 145], device="cuda", dtype=torch.int32), 70, 140, dropout_p=0.2,
                           causal=causal).sum().backward()
torch.cuda.synchronize()
print("sanitizer case done")
