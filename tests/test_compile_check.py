"""Every Triton kernel compiles for an H100 (sm_90) with the arguments its host wrapper launches it with.

The rest of the CPU suite runs the kernels under Triton's interpreter, which never lowers them; this compiles
them with Triton's own ptxas, no GPU needed (`python -m kernels.compile_check`).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return os.path.exists(os.environ.get("TRITON_PTXAS_PATH") or os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas"))


def _offline_compile_api() -> bool:
    """A Triton whose backends parse "D" (divisible by 16) attributes, as compile_check passes them (3.8 here)."""
    from triton.backends.compiler import BaseBackend

    return hasattr(BaseBackend, "parse_attr")


pytestmark = pytest.mark.skipif(not (_nvidia_backend() and _offline_compile_api()),
                                reason="needs Triton's NVIDIA backend (ptxas) and its offline compile API")


def check(*args, pythonpath=ROOT):
    env = dict(os.environ, PYTHONPATH=pythonpath + os.pathsep + ROOT)
    env.pop("TRITON_INTERPRET", None)  # (conftest sets it for this process; the check runs each step as it needs)
    return subprocess.run([sys.executable, "-m", "kernels.compile_check", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)


def launchable_kernels() -> set[str]:
    import kernels.moe.triton as moe
    import kernels.mta.triton as mta
    import kernels.nsa.triton as nsa

    return {name for module in (nsa, mta, moe) for name, obj in vars(module).items()
            if name.endswith("_kernel") and hasattr(obj, "fn")}


def test_every_kernel_compiles_for_sm90_as_its_wrapper_launches_it():
    out = check("--quick", "--arch", "90", "--json")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["problems"] == []
    compiled = {r["kernel"] for r in report["results"]}
    assert compiled == launchable_kernels()  # a kernel the recorder never launches would go unchecked
    assert all(0 < r["shared"] <= 232448 and r["registers"] for r in report["results"])


def test_a_kernel_that_does_not_compile_and_one_over_the_shared_memory_limit_are_reported(tmp_path):
    (tmp_path / "broken_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _odd_kernel(X, N, B: tl.constexpr):
            o = tl.arange(0, B)  # B = 10: not a power of two, which only the compiler rejects
            tl.store(X + o, tl.load(X + o, mask=o < N), mask=o < N)
        '''))
    odd = {"module": "broken_kernels", "name": "_odd_kernel", "case": "odd", "options": {}, "constexprs": ["B"],
           "args": {"X": {"tensor": "fp32"}, "N": {"int": 10}, "B": {"int": 10}}}
    # dK/dV of a whole 256-token cube in one tile: 397 KB of shared memory (why kernels/nsa/triton.py tiles cubes);
    # "D": the JIT's divisible-by-16 specialisation of aligned pointers and of ints like 512
    D = {"spec": "D"}
    big = {"module": "kernels.nsa.triton", "name": "_bwd_dkv_kernel", "case": "cube of 256", "options": {},
           "constexprs": ["BLOCK_Q", "BLOCK_K", "D"],
           "args": {**{n: {"tensor": "bf16", **D} for n in ("Q", "K", "V", "DO", "DK", "DV")},
                    **{n: {"tensor": "fp32", **D} for n in ("LSE", "DELTA")},
                    **{n: {"tensor": "i32", **D} for n in ("OFFSETS", "QBLOCKS")},
                    "sm_scale": {"float": 0.125}, **{n: {"int": 512, **D} for n in ("NQ", "NK")}, "NKB": {"int": 2},
                    "H": {"int": 8}, "HKV": {"int": 8}, "BLOCK_Q": {"int": 256}, "BLOCK_K": {"int": 256}, "D": {"int": 64}}}
    launches = tmp_path / "launches.json"
    launches.write_text(json.dumps([odd, big]))
    out = check("--compile", str(launches), "--arch", "90", pythonpath=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    problems = json.loads(out.stdout)["problems"]
    assert len(problems) == 2
    assert problems[0].startswith("sm_90 _odd_kernel (odd)")
    assert problems[1].startswith("sm_90 _bwd_dkv_kernel (cube of 256)") and "over the chip's 232448" in problems[1]
