"""Attention kernels alone at FLUX.1 (1024x1024: 4,608 tokens x 24 heads) and Wan 2.1 14B (480p x 81 frames: 32,760
tokens x 40 heads) shapes, head dim 128, bf16: ms, TFLOP/s and relative L2 error against an fp32 reference; then
FLUX's attention with its q/k RMSNorm and RoPE in front, eager and compiled, with the CUDA kernels' times (profiler).
Kernels: torch SDPA (cuDNN, flash-2; strided views as diffusers passes them and contiguous), FlashAttention-3 from
the ``fa3-fwd`` wheel in bf16 and in FP8 (per-tensor scales, and the library's per-head ``fp8_attention``, eager
and compiled; quantization included), FlashAttention-4 (``flash-attn-4``, CuTe DSL) in bf16, SageAttention 1
(Triton, 8-bit QK). A missing package is recorded as such. GPU only: ``python3 -m aitk_inference.benchmarks.attention_kernels``
(writes ``attn_probe.json`` to $OUT or the working folder)."""
import json, os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = "cuda"
torch.manual_seed(0)
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": {}}


def bench(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


shapes = {"flux_1024": (1, 4608, 24, 128), "wan14b_480p_81f": (1, 32760, 40, 128)}
kernels = {}
kernels["sdpa_default_BHSD_contig"] = lambda q, k, v: F.scaled_dot_product_attention(
    q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()).transpose(1, 2)
QT = {}


def prep_t(q, k, v):
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def sdpa_on(backend, contiguous):
    def run(q, k, v):
        qq, kk, vv = QT["c" if contiguous else "t"]
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qq, kk, vv)
    return run


try:
    import fa3_fwd_interface as fa3
    kernels["fa3_bf16_BSHD"] = lambda q, k, v: fa3.flash_attn_func(q, k, v)

    def fa3_fp8(q, k, v):
        qs, ks, vs = (t.abs().amax().float() / 448.0 for t in (q, k, v))
        q8, k8, v8 = ((t / s).to(torch.float8_e4m3fn) for t, s in ((q, qs), (k, ks), (v, vs)))
        b, _, h, _ = q.shape
        d = lambda s: s.reshape(1, 1).expand(b, h).contiguous()
        return fa3.flash_attn_func(q8, k8, v8, q_descale=d(qs), k_descale=d(ks), v_descale=d(vs))
    kernels["fa3_fp8_pertensor_incl_quant"] = fa3_fp8
    from aitk_inference.pipelines.runtime.accelerate import use_fa3_fwd_if_needed
    from aitk_inference.pipelines.runtime.fp8_attention import fp8_attention

    use_fa3_fwd_if_needed()
    kernels["fa3_fp8_perhead_incl_quant"] = fp8_attention  # the library's attention="flash_attn_3_fp8"
    kernels["fa3_fp8_perhead_incl_quant_compiled"] = torch.compile(fp8_attention, fullgraph=True)
    res["fa3_import"] = "ok"
except Exception as e:
    res["fa3_import"] = repr(e)
try:
    from flash_attn.cute import flash_attn_func as fa4_func

    def fa4(q, k, v):
        out = fa4_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    kernels["fa4_bf16_BSHD"] = fa4
    res["fa4_import"] = "ok"
except Exception as e:
    res["fa4_import"] = repr(e)
try:
    from sageattention import sageattn
    kernels["sage1_triton_NHD"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    res["sage_import"] = "ok"
except Exception as e:
    res["sage_import"] = repr(e)

for shape_name, (b, s, h, d) in shapes.items():
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    QT["t"] = prep_t(q, k, v)
    QT["c"] = tuple(t.contiguous() for t in QT["t"])
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if s > 10000 else SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*(t.float() for t in QT["c"])).transpose(1, 2)
    ks = dict(kernels)
    ks["sdpa_cudnn_strided_view"] = sdpa_on(SDPBackend.CUDNN_ATTENTION, False)
    ks["sdpa_cudnn_contiguous"] = sdpa_on(SDPBackend.CUDNN_ATTENTION, True)
    ks["sdpa_flash2_contiguous"] = sdpa_on(SDPBackend.FLASH_ATTENTION, True)
    flops = 4 * b * h * s * s * d
    for name, fn in ks.items():
        try:
            out = fn(q, k, v)
            if out.dim() == 4 and out.shape[1] == h and out.shape[2] == s:
                out = out.transpose(1, 2)
            ms = bench(lambda: fn(q, k, v), reps=30 if s < 10000 else 8)
            res["kernels"].setdefault(shape_name, {})[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
                                                                "rel_err_vs_fp32": round(rel(out, ref), 6)}
        except Exception as e:
            res["kernels"].setdefault(shape_name, {})[name] = {"error": repr(e)[:300]}
        print(shape_name, name, res["kernels"][shape_name][name], flush=True)
    del ref
    torch.cuda.empty_cache()

# compiled vs eager: FLUX attention with q/k RMSNorm + RoPE in front, diffusers' layout (B,S,H,D) -> transpose
b, s, h, d = shapes["flux_1024"]
x = torch.randn(b, s, 3 * h * d, device=dev, dtype=torch.bfloat16)
wq = torch.ones(d, device=dev, dtype=torch.bfloat16)
freqs = torch.randn(s, d // 2, device=dev)
cos, sin = freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)


def rope(t):
    t_ = t.float().unflatten(-1, (-1, 2))
    real, imag = t_.unbind(-1)
    rot = torch.stack([-imag, real], -1).flatten(3)
    return (t.float() * cos[None, :, None] + rot * sin[None, :, None]).to(t.dtype)


def block(x, backend=None):
    q, k, v = x.view(b, s, 3, h, d).unbind(2)
    q = F.rms_norm(q, (d,), wq, 1e-6)
    k = F.rms_norm(k, (d,), wq, 1e-6)
    q, k = rope(q), rope(k)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(b, s, h * d)


def block_contig(x):
    q, k, v = x.view(b, s, 3, h, d).unbind(2)
    q = F.rms_norm(q, (d,), wq, 1e-6)
    k = F.rms_norm(k, (d,), wq, 1e-6)
    q, k = rope(q), rope(k)
    o = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                       v.transpose(1, 2).contiguous())
    return o.transpose(1, 2).reshape(b, s, h * d)


def kernel_times(fn):
    from torch.profiler import profile, ProfilerActivity
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0):
            t = getattr(e, "self_device_time_total", 0) / 10 / 1000
            if t > 0.01:
                out[e.key[:90]] = round(t, 4)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


comp = {}
for name, fn in {"eager": lambda: block(x), "eager_contig": lambda: block_contig(x)}.items():
    comp[name] = {"ms": round(bench(fn), 4), "kernels": kernel_times(fn)}
    print(name, comp[name], flush=True)
for name, f in {"compiled": block, "compiled_contig": block_contig}.items():
    cf = torch.compile(f, dynamic=False)
    fn = lambda: cf(x)
    comp[name] = {"ms": round(bench(fn), 4), "kernels": kernel_times(fn)}
    print(name, comp[name], flush=True)
res["compiled_vs_eager_flux_attention_block"] = comp
out = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out, "attn_probe.json"), "w"), indent=1)
