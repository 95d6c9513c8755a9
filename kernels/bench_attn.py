"""The harness behind `sigma bench-attn`: dense SDPA against sparse attention, forward and forward + backward.

Shared by the attention ops (nsa/ now, mta/ once it lands), so it lives beside their folders. Every backend is
first checked against its reference at a small size; timings are the minimum over `repeats` runs after a
warm-up, with the CUDA stream synchronised; peak memory is the allocator's peak on CUDA and the sampled
resident-set growth on the CPU (which has no resettable allocator statistics).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BenchConfig:
    grids: list = field(default_factory=lambda: [(4, 16, 16), (8, 16, 16), (8, 32, 32), (16, 32, 32)])
    heads: int = 8
    head_dim: int = 64
    cube: tuple = (4, 4, 4)
    top_n: int = 8
    radius: tuple = (0, 0, 0)
    compress: str = "mlp"
    dtype: str = "fp32"
    device: str = "cpu"
    backward: bool = True
    repeats: int = 3
    backends: list | None = None  # NSA backends; default: every one available on the device
    reference_max_tokens: int = 4096  # the references materialise N x N: skip them above this
    mta: bool = False  # also Multi-Token Attention (bidirectional, key-query kernel mta_kernel)
    mta_kernel: tuple = (6, 11)
    mta_backends: list | None = None  # default: triton on CUDA (where the heads and head dim fit it), cpu, reference


def available_nsa_backends(device: str, with_optional: bool = False) -> list[str]:
    """The default set; with_optional adds "flex" (compiles for tens of seconds per shape; CPU: forward only)."""
    out = ["cpu"] if device == "cpu" else ["triton"]
    return out + ["reference"] + (["flex"] if with_optional else [])


def available_mta_backends(device: str, heads: int | None = None, head_dim: int | None = None) -> list[str]:
    """The default set: the fused kernel on CUDA where it takes the heads and head dim (a power-of-two number of
    heads, head dim >= 16; given both), the chunked path and the reference."""
    fits = heads is None or head_dim is None or _mta_shapes_ok(heads, head_dim)
    return (["triton"] if device == "cuda" and fits else []) + ["cpu", "reference"]


def _mta_shapes_ok(heads: int, head_dim: int) -> bool:
    from kernels.mta.triton import shapes_ok  # imported here: triton is optional

    return shapes_ok(heads, head_dim)


# ---- measuring ---------------------------------------------------------------------------------------------
def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (Triton compilation, allocator, caches)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _mmap_large_blocks():
    """glibc serves big blocks from a retained heap once it has freed one (its mmap threshold adapts), and then
    the resident set no longer grows with a tensor's allocation. A fixed threshold keeps every block over 64 KB
    mmap'd, so it is mapped on allocation and returned on free: the sampled RSS then follows the tensors."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn, device: str) -> float | None:
    """Peak extra memory of one call of fn, in MB."""
    if device == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        base = _rss()
    except OSError:  # not Linux
        return None
    _mmap_large_blocks()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, peak[0] - base) / 2**20


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, NaN-aware (an unwritten output must not pass)."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# ---- the methods ---------------------------------------------------------------------------------------------
def _inputs(cfg: BenchConfig, grid, requires_grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, H, K = math.prod(grid), cfg.heads, cfg.head_dim
    dtype, dev = DTYPES[cfg.dtype], cfg.device
    make = lambda *s: torch.randn(*s, generator=g).to(dev, dtype).requires_grad_(requires_grad)  # noqa: E731
    q, k, v = make(1, H, N, K), make(1, H, N, K), make(1, H, N, K)
    x = make(1, N, H * K)
    do = torch.randn(1, H, N, K, generator=g).to(dev, dtype)
    return x, q, k, v, do


def nsa_module(cfg: BenchConfig, grid, backend: str):
    from kernels.nsa.module import NSA3D

    torch.manual_seed(0)
    m = NSA3D(cfg.heads * cfg.head_dim, cfg.heads, cfg.head_dim, grid, cfg.cube, top_n=cfg.top_n,
              radius=cfg.radius, compress=cfg.compress, backend=backend)
    with torch.no_grad():  # non-trivial gates and compressor so every term is exercised
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m.to(cfg.device, DTYPES[cfg.dtype])


def mta_module(cfg: BenchConfig, backend: str):
    from kernels.mta.module import MTA

    torch.manual_seed(0)
    # layer 3 with kq_every 4: this layer runs both key-query convolutions
    m = MTA(cfg.heads * cfg.head_dim, cfg.heads, cfg.head_dim, causal=False, layer=3, kernel=tuple(cfg.mta_kernel),
            head_group=2 if cfg.heads % 2 == 0 else 1, backend=backend)
    with torch.no_grad():  # identity plus noise, so every tap and mixing weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.to(cfg.device, DTYPES[cfg.dtype])


def methods(cfg: BenchConfig, grid) -> dict:
    """name -> (forward fn(x, q, k, v) -> o, parameters needing gradients)."""
    out = {}
    sdpa = lambda x, q, k, v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    if cfg.device == "cuda" and cfg.dtype != "fp32":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(x, q, k, v):  # noqa: F811
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

    out["sdpa"] = (sdpa, [])
    for backend in cfg.backends or available_nsa_backends(cfg.device):
        if backend == "reference" and math.prod(grid) > cfg.reference_max_tokens:
            continue
        m = nsa_module(cfg, grid, backend)
        out[f"nsa-{backend}"] = (m, list(m.parameters()))
    for backend in (cfg.mta_backends or available_mta_backends(cfg.device, cfg.heads, cfg.head_dim)) if cfg.mta else []:
        if backend == "reference" and math.prod(grid) > cfg.reference_max_tokens:
            continue
        m = mta_module(cfg, backend)
        out[f"mta-{backend}"] = (m, list(m.parameters()))
    return out


def errors(o, grads, o_ref, grads_ref) -> dict:
    """Relative errors of the output, dq, dk, dv and of all parameter gradients taken as one vector (some are
    ~0 in exact arithmetic, e.g. a bias shared by every compressed key cancels in the softmax, so per-tensor
    ratios would mislead)."""
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    return {"o": rel_err(o, o_ref), "dq": rel_err(grads[0], grads_ref[0]), "dk": rel_err(grads[1], grads_ref[1]),
            "dv": rel_err(grads[2], grads_ref[2]), "dparams": rel_err(flat(grads[3:]), flat(grads_ref[3:]))}


def check_backends(cfg: BenchConfig) -> dict:
    """Each NSA backend against the reference on a grid of 2 x 2 x 2 cubes (top-n capped at 3): relative error
    of the output and of dq, dk, dv, and of the module's parameter gradients."""
    grid = tuple(2 * c for c in cfg.cube)
    small = BenchConfig(**{**asdict(cfg), "top_n": min(cfg.top_n, 3), "grids": [grid]})
    x, q, k, v, do = _inputs(small, grid, requires_grad=True, seed=1)
    results, ref = {}, None
    for backend in ["reference"] + [b for b in (cfg.backends or available_nsa_backends(cfg.device)) if b != "reference"]:
        m = nsa_module(small, grid, backend)
        if backend == "flex" and cfg.device == "cpu":  # forward only
            with torch.no_grad():
                results[backend] = {"o": rel_err(m(x.detach(), q.detach(), k.detach(), v.detach()), ref[0])}
            continue
        o = m(x, q, k, v)
        grads = torch.autograd.grad(o, [q, k, v, *m.parameters()], do)
        if ref is None:
            ref = (o, grads)
            continue
        results[backend] = errors(o, grads, *ref)
    if cfg.mta:  # MTA backends against the MTA reference on 32 tokens (two tiles of the Triton kernel)
        x, q, k, v, do = _inputs(small, (1, 4, 8), requires_grad=True, seed=2)
        ref = None
        for backend in ["reference"] + [b for b in (cfg.mta_backends or available_mta_backends(cfg.device, cfg.heads, cfg.head_dim)) if b != "reference"]:
            m = mta_module(small, backend)
            o = m(x, q, k, v)
            grads = torch.autograd.grad(o, [q, k, v, *m.parameters()], do)
            if ref is None:
                ref = (o, grads)
                continue
            results[f"mta-{backend}"] = errors(o, grads, *ref)
    return results


def bench_grid(cfg: BenchConfig, grid) -> dict:
    row = {"grid": list(grid), "tokens": math.prod(grid), "methods": {}}
    for name, (fn, params) in methods(cfg, grid).items():
        x, q, k, v, do = _inputs(cfg, grid, requires_grad=False)
        with torch.no_grad():
            fwd = lambda: fn(x, q, k, v)  # noqa: E731
            entry = {"forward_s": best_time(fwd, cfg.device, cfg.repeats), "forward_peak_mb": peak_memory_mb(fwd, cfg.device)}
        no_backward = (name == "nsa-flex" and cfg.device == "cpu"  # no CPU backward in flex_attention
                       or name.endswith("-reference") and row["tokens"] > 4096)  # saved N x N tensors: tens of GB
        if cfg.backward and not no_backward:
            x, q, k, v, do = _inputs(cfg, grid, requires_grad=True)
            leaves = [q, k, v, *params]

            def fwd_bwd():
                torch.autograd.grad(fn(x, q, k, v), leaves, do)

            entry["forward_backward_s"] = best_time(fwd_bwd, cfg.device, cfg.repeats)
            entry["forward_backward_peak_mb"] = peak_memory_mb(fwd_bwd, cfg.device)
        row["methods"][name] = entry
    base = row["methods"]["sdpa"]
    for name, entry in row["methods"].items():
        entry["forward_speedup"] = base["forward_s"] / entry["forward_s"]
        if "forward_backward_s" in entry:
            entry["forward_backward_speedup"] = base["forward_backward_s"] / entry["forward_backward_s"]
    return row


def break_even(rows: list[dict], name: str, key: str) -> str | float | None:
    """Smallest token count where `name` is as fast as SDPA, interpolated in log-log between measured grids."""
    pts = [(r["tokens"], r["methods"][name][key]) for r in rows if name in r["methods"] and key in r["methods"][name]]
    if not pts:
        return None
    if pts[0][1] >= 1:
        return f"<= {pts[0][0]}"
    for (n0, s0), (n1, s1) in zip(pts, pts[1:]):
        if s0 < 1 <= s1:
            f = (0 - math.log(s0)) / (math.log(s1) - math.log(s0))
            return round(math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0))))
    return f"> {pts[-1][0]}"


def run(cfg: BenchConfig, on_grid=None) -> dict:
    result = {"config": {**asdict(cfg), "grids": [list(g) for g in cfg.grids]}, "check": check_backends(cfg), "rows": []}
    for grid in cfg.grids:
        result["rows"].append(bench_grid(cfg, grid))
        if on_grid:
            on_grid(grid)
    names = sorted({n for r in result["rows"] for n in r["methods"] if n != "sdpa"})
    keys = ["forward_speedup"] + (["forward_backward_speedup"] if cfg.backward else [])
    result["break_even_tokens"] = {n: {k: break_even(result["rows"], n, k) for k in keys} for n in names}
    return result
