"""Compile every Triton kernel for a GPU without a GPU.

    python -m kernels.compile_check [--arch 90 --arch 80] [--quick] [--json]

The CPU tests run the kernels under Triton's interpreter, which executes their Python with NumPy and never
lowers them: a tile shape tl.dot refuses, a dtype mix the compiler rejects, or more shared memory than the chip
has would only show on the first GPU run. This check closes that gap on any machine with Triton's NVIDIA
backend (its bundled ptxas; no driver needed). Two steps, each in its own process, since one process cannot mix
interpreted and compiled kernels:

1. record: with TRITON_INTERPRET=1, run the public ops (NSA 3D and causal, MTA, the MoE experts), forward and backward, on CPU
   tensors at the shapes the GPU suite and the toolkit use, and record each kernel launch's argument types and
   compile-time constants instead of running it (so the shapes can be GPU-sized and the step still takes
   seconds; the outputs are left unwritten, which only the values, never the next launch's types, depend on);
2. compile: without the interpreter, compile each distinct launch with Triton for each architecture
   (sm_90 = H100/H200, sm_80 = A100) to a cubin, and report registers, spills and shared memory against the
   chip's limit per block.

Exit status 1 if any kernel fails to compile or needs more shared memory than its chip has.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

# Shared memory one block may use (opt-in maximum), bytes: H100/H200 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}
_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int32": "i32",
           "torch.int64": "i64", "torch.bool": "u1", "torch.uint8": "u8"}


def _spec(value) -> str:
    """The specialisation Triton's JIT gives a runtime argument at launch: "D" for a tensor whose address, or an
    int whose value, is divisible by 16 (the compiler then vectorises loads and pipelines accordingly; an int equal
    to 1 becomes a constant, handled in compile_launch)."""
    number = value.data_ptr() if hasattr(value, "data_ptr") else value
    return "D" if number % 16 == 0 else ""


# ---- step 1: record the launches -----------------------------------------------------------------------------
def _describe(fn, args, kwargs) -> dict:
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    described = {}
    for name, value in values.items():
        if hasattr(value, "dtype") and hasattr(value, "data_ptr"):
            described[name] = {"tensor": _DTYPES[str(value.dtype)], "spec": _spec(value)}
        elif isinstance(value, bool):
            described[name] = {"bool": value}
        elif isinstance(value, int):
            described[name] = {"int": value, "spec": _spec(value)}
        elif isinstance(value, float):
            described[name] = {"float": value}
        elif value is None:
            described[name] = {"none": None}
        elif isinstance(value, str):  # a constexpr option (tl.dot's input precision)
            described[name] = {"str": value}
        else:
            raise TypeError(f"{fn.__name__}: cannot describe argument {name} of type {type(value).__name__}")
    params = inspect.signature(fn.fn).parameters
    constexprs = [n for n in fn.arg_names if "constexpr" in str(params[n].annotation)]
    return {"module": fn.fn.__module__, "name": fn.fn.__name__, "args": described, "options": options,
            "constexprs": constexprs}


def _cases(quick: bool):
    """(label, thunk) pairs: each runs one public op forward and backward with backend="triton" on the CPU."""
    import torch

    from kernels.mta import identity_kq, mta
    from kernels.nsa import cube_neighbourhood, nsa_3d, nsa_causal

    def nsa3d(dtype, H, hkv, D, cube, cubes, top_n=4):
        def run():
            block, nb = cube[0] * cube[1] * cube[2], cubes[0] * cubes[1] * cubes[2]
            N = block * nb
            r = lambda *s: torch.zeros(*s, dtype=dtype, requires_grad=True)  # noqa: E731
            inputs = [r(1, H, N, D), r(1, hkv, N, D), r(1, hkv, N, D), r(1, hkv, nb, D), r(1, hkv, nb, D),
                      r(1, H, N), r(1, H, N)]
            o = nsa_3d(*inputs, block=block, top_n=top_n, forced=cube_neighbourhood(cubes, (0, 1, 1)), backend="triton")
            torch.autograd.grad(o, inputs[:5], torch.zeros_like(o))
        return f"nsa_3d {str(dtype)[6:]} H{H}/{hkv} D{D} cube {cube} x {cubes}", run

    def causal(dtype, H, hkv, D, block, N):
        def run():
            r = lambda *s: torch.zeros(*s, dtype=dtype, requires_grad=True)  # noqa: E731
            inputs = [r(1, H, N, D), r(1, hkv, N, D), r(1, hkv, N, D), r(1, hkv, N // block, D), r(1, hkv, N // block, D)]
            gates = [torch.rand(1, H, N) for _ in range(3)]
            o = nsa_causal(*inputs, *gates[:2], block=block, top_n=4, window=64, g_win=gates[2], backend="triton")
            torch.autograd.grad(o, inputs[:3], torch.zeros_like(o))
        return f"nsa_causal {str(dtype)[6:]} H{H}/{hkv} D{D} block {block}", run

    def multi_token(dtype, H, D, kernel, causal_, S=100):
        def run():
            w = [identity_kq(H, *kernel, causal_), torch.eye(H), identity_kq(H, *kernel, causal_),
                 torch.eye(2).expand(H // 2, 2, 2).contiguous()]
            inputs = [torch.zeros(1, H, S, D, dtype=dtype, requires_grad=True) for _ in range(3)]
            inputs += [t.requires_grad_() for t in w]
            o = mta(*inputs[:3], *inputs[3:], causal=causal_, backend="triton")
            torch.autograd.grad(o, inputs, torch.zeros_like(o))
        return f"mta {str(dtype)[6:]} H{H} D{D} kernel {kernel} causal={causal_}", run

    def moe(dtype, T, D, F, E, k):
        def run():
            from kernels.moe import moe_ffn

            r = lambda *s: torch.zeros(*s, dtype=dtype, requires_grad=True)  # noqa: E731
            inputs = [r(T, D), r(E, D, 2 * F), r(E, F, D), r(T, k)]
            idx = torch.arange(T * k).remainder(E).view(T, k)
            o = moe_ffn(*inputs[:3], idx, inputs[3], backend="triton")
            torch.autograd.grad(o, inputs, torch.zeros_like(o))
        return f"moe {str(dtype)[6:]} T{T} D{D} F{F} E{E} top-{k}", run

    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.bfloat16 if quick else torch.float16
    cases = [nsa3d(bf16, 8, 8, 64, (4, 4, 4), (2, 4, 4)), nsa3d(f32, 8, 2, 64, (4, 4, 4), (2, 4, 4)),
             causal(bf16, 8, 2, 64, 32, 256), causal(f32, 16, 1, 64, 32, 256),
             multi_token(bf16, 8, 64, (6, 11), False), multi_token(f32, 8, 64, (6, 11), True),
             nsa3d(bf16, 8, 8, 64, (4, 8, 8), (2, 2, 2), top_n=2),  # a cube of 256 tokens: tiles, not one tile
             moe(bf16, 4096, 256, 128, 16, 4), moe(f32, 4096, 256, 128, 16, 4)]
    if not quick:  # the other dtypes, head dims and cube sizes the toolkit's models and benchmarks launch
        cases += [nsa3d(f16, 8, 8, 64, (4, 4, 4), (2, 4, 4)), nsa3d(bf16, 4, 4, 32, (2, 4, 4), (2, 4, 4)),
                  nsa3d(bf16, 8, 8, 128, (4, 4, 4), (4, 4, 4)), nsa3d(bf16, 16, 16, 64, (1, 4, 4), (1, 8, 8)),
                  nsa3d(f32, 8, 8, 128, (4, 4, 8), (2, 2, 2), top_n=2),
                  causal(bf16, 8, 2, 64, 128, 512),
                  causal(bf16, 8, 8, 64, 16, 256), causal(bf16, 8, 2, 128, 64, 512), causal(f16, 4, 1, 32, 16, 128),
                  multi_token(f16, 8, 64, (6, 11), False), multi_token(bf16, 4, 128, (6, 11), True),
                  multi_token(bf16, 16, 32, (3, 5), False), multi_token(bf16, 2, 64, (1, 1), True),
                  moe(f16, 4096, 256, 128, 16, 4), moe(bf16, 2048, 128, 64, 16, 2)]  # bench-moe; the LM's defaults
    return cases


def record(quick: bool) -> list[dict]:
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001  (recorded, not executed)
        launches.append(_describe(self, args, kwargs))

    InterpretedFunction.run = run
    import kernels.nsa.triton as nsa_triton

    nsa_triton.FILL_NAN = False
    import kernels.moe.triton as moe_triton

    moe_triton.FILL_NAN = False
    for label, thunk in _cases(quick):
        before = len(launches)
        thunk()
        for launch in launches[before:]:
            launch["case"] = label
    unique, seen = [], set()
    for launch in launches:
        key = json.dumps([launch["module"], launch["name"], _signature_key(launch)], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(launch)
    return unique


def _signature_key(launch: dict) -> dict:
    """What Triton compiles a launch by: tensor dtypes, constexpr values, and a runtime int only by its width."""
    key = {}
    for name, a in launch["args"].items():
        runtime_int = "int" in a and name not in launch["constexprs"]
        key[name] = [_scalar_type(a["int"]) if a["int"] != 1 else 1, a.get("spec", "")] if runtime_int else a
    return key | {"options": launch["options"]}


# ---- step 2: compile them ------------------------------------------------------------------------------------
def _scalar_type(value: int) -> str:
    return "i32" if -(2**31) <= value < 2**31 else "i64"


def compile_launch(launch: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        a = launch["args"][name]
        if name in constexpr:
            signature[name] = "constexpr"
            constants[name] = next(iter(a.values()))
        elif "tensor" in a:
            signature[name] = "*" + a["tensor"]
        elif "int" in a and a["int"] == 1:  # the JIT passes a runtime 1 as a constant
            signature[name] = "constexpr"
            constants[name] = 1
        elif "int" in a:
            signature[name] = _scalar_type(a["int"])
        elif "float" in a:
            signature[name] = "fp32"
        elif "bool" in a:
            signature[name] = "u1"
        else:
            raise TypeError(f"{launch['name']}: a None for the non-constexpr argument {name}")
        if a.get("spec") and signature[name] != "constexpr":
            attrs[(i,)] = BaseBackend.parse_attr(a["spec"])
    options = {k: v for k, v in launch["options"].items() if k in ("num_warps", "num_stages", "num_ctas")}
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options=options)
    meta = kernel.metadata
    n_regs, n_spills = _registers(kernel)
    return {"kernel": launch["name"], "case": launch["case"], "arch": arch, "seconds": round(time.perf_counter() - start, 2),
            "shared": meta.shared, "num_warps": meta.num_warps, "num_stages": meta.num_stages,
            "registers": n_regs, "spills": n_spills,
            "constexprs": {k: v for k, v in constants.items()}}


def _registers(kernel) -> tuple[int | None, int | None]:
    """Registers per thread and spill stores, read from ptxas's own report of the cubin (no driver needed)."""
    import re
    import tempfile

    import triton.backends.nvidia as nvidia

    ptxas = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")
    arch = kernel.metadata.target.arch
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def compile_all(launches: list[dict], archs: list[int]) -> tuple[list[dict], list[str]]:
    results, problems = [], []
    for arch in archs:
        for launch in launches:
            try:
                r = compile_launch(launch, arch)
            except Exception as e:  # noqa: BLE001  (every failure is reported, then the next kernel)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                problems.append(f"sm_{arch} {launch['name']} ({launch['case']}): {type(e).__name__}: {first}")
                continue
            results.append(r)
            if r["registers"] is None:
                problems.append(f"sm_{arch} {r['kernel']} ({r['case']}): ptxas -v reported no registers")
            limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
            if r["shared"] > limit:
                problems.append(f"sm_{arch} {r['kernel']} ({r['case']}): {r['shared']} bytes of shared memory, "
                                f"over the chip's {limit} per block")
    return results, problems


# ---- driver --------------------------------------------------------------------------------------------------
def _subprocess(args: list[str], interpret: bool) -> str:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "kernels.compile_check", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: {' '.join(args[:1])} step failed:\n{out.stderr.strip()[-4000:]}")
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default: 90 and 80)")
    parser.add_argument("--quick", action="store_true", help="only the GPU suite's shapes and a 256-token cube, bf16 and fp32")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", metavar="FILE", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    archs = a.arch or [90, 80]
    if a.record:
        print(json.dumps(record(a.quick)))
        return 0
    if a.compile:
        from kernels.common import triton_interpreted

        if triton_interpreted():
            raise SystemExit("error: --compile needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
        with open(a.compile) as f:
            launches = json.load(f)
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # Triton prints a failing ptxas's whole PTX to stdout
            results, problems = compile_all(launches, archs)
        print(json.dumps({"results": results, "problems": problems}))
        return 0
    import tempfile

    launches = json.loads(_subprocess(["--record"] + (["--quick"] if a.quick else []), interpret=True))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(launches, f)
    try:
        report = json.loads(_subprocess(["--compile", f.name] + sum((["--arch", str(x)] for x in archs), []), interpret=False))
    finally:
        os.unlink(f.name)
    report["launches"] = len(launches)
    if a.json:
        print(json.dumps(report))
    else:
        for r in report["results"]:
            print(f"sm_{r['arch']} {r['kernel']:<24} {r['registers']!s:>4} regs {r['spills']!s:>5} B spilled "
                  f"{r['shared']:>7} B shared  {r['seconds']:5.1f} s  ({r['case']})")
        print(f"{len(launches)} distinct launches x {len(archs)} architectures: {len(report['results'])} compiled, "
              f"{len(report['problems'])} problems")
        for p in report["problems"]:
            print("problem:", p)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
