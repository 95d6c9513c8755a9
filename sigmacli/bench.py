"""`sigma bench-attn`: dense SDPA against sparse attention (every available backend), with a PNG plot."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sigmacli.app import app
from sigmacli.common import DeviceOpt, JsonOpt, command, emit, output_picture, parse_grid, picture_file


@app.command("bench-attn")
@command
def bench_attn(
    grid: Annotated[str, typer.Option(help="Token grids TxHxW, comma-separated (one point of the plot each).")] = "4x16x16,8x16x16,8x32x32,16x32x32",
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    head_dim: Annotated[int, typer.Option(help="Head dimension.")] = 64,
    cube: Annotated[str, typer.Option(help="NSA cube TxHxW (tokens per block = its volume).")] = "4x4x4",
    top_n: Annotated[int, typer.Option(help="NSA: KV cubes selected per query cube beyond the forced ones.")] = 8,
    radius: Annotated[str, typer.Option(help="NSA: forced neighbourhood TxHxW in cubes (0x0x0 = own cube).")] = "0x0x0",
    compress: Annotated[str, typer.Option(help="NSA compression: mlp | mean.")] = "mlp",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16")] = "fp32",
    backends: Annotated[str, typer.Option(help="NSA backends, comma-separated: cpu, triton (CUDA), reference (small sizes), flex (compiled flex_attention selected branch; CPU: forward only). Default: cpu or triton, and reference.")] = "",
    backward: Annotated[bool, typer.Option(help="Also time forward + backward.")] = True,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (the minimum is reported).")] = 3,
    mta: Annotated[bool, typer.Option(help="Also Multi-Token Attention (bidirectional).")] = False,
    mta_backends: Annotated[str, typer.Option(help="MTA backends, comma-separated: triton (fused kernel; CUDA, or the interpreter), cpu, reference. Default: triton on CUDA (a power-of-two number of heads, head dim >= 16), cpu, reference.")] = "",
    mta_kernel: Annotated[str, typer.Option(help="MTA key-query kernel QxK (query rows x key columns).")] = "6x11",
    reference_max_tokens: Annotated[int, typer.Option(help="Skip the materialising references above this many tokens.")] = 4096,
    out: Annotated[Path, typer.Option(parser=picture_file, metavar="<path>", help="PNG plot of time and speed-up against tokens.")] = Path("bench-attn.png"),
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
):
    """Time dense SDPA, 3D NSA and (--mta) Multi-Token Attention, forward and forward + backward; check each backend against its reference first."""
    import math

    from kernels.bench_attn import DTYPES, BenchConfig, available_nsa_backends, run
    from pipelines.errors import SigmaError, release_notes
    from pipelines.train import resolve_device, warn_slow_half
    from pipelines.visual import save_plot

    grids = [parse_grid(g.strip(), "--grid") for g in grid.split(",") if g.strip()]
    cube_t, radius_t = parse_grid(cube, "--cube"), parse_grid(radius, "--radius", minimum=0)
    if not grids:
        raise SigmaError("--grid needs at least one TxHxW grid")
    for g in grids:
        if any(n % c for n, c in zip(g, cube_t)):
            raise SigmaError(f"the grid {'x'.join(map(str, g))} is not divisible by the cube {cube}")
    if dtype not in DTYPES:
        raise SigmaError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if heads < 1 or head_dim < 1 or top_n < 0 or repeats < 1:
        raise SigmaError("--heads, --head-dim and --repeats must be positive, --top-n non-negative")
    if compress not in ("mlp", "mean"):
        raise SigmaError(f"--compress must be mlp or mean, not {compress!r}")
    dev = resolve_device(device).type
    chosen = [b.strip() for b in backends.split(",") if b.strip()] or None
    have = available_nsa_backends(dev, with_optional=True)
    for b in chosen or []:
        if b not in have:
            raise SigmaError(f"NSA backend {b!r} is not available on {dev} (have: {', '.join(have)})")
    if "triton" in (chosen or have) and (head_dim < 16 or head_dim & (head_dim - 1) or math.prod(cube_t) < 16
                                         or math.prod(cube_t) & (math.prod(cube_t) - 1)):
        raise SigmaError("the Triton kernels need a power-of-two head dim and cube volume, both >= 16")
    mta_chosen = [b.strip() for b in mta_backends.split(",") if b.strip()] or None
    for b in mta_chosen or []:
        if b not in ("triton", "cpu", "reference"):
            raise SigmaError(f"MTA backend {b!r} is unknown (have: triton, cpu, reference)")
    from kernels.common import triton_interpreted

    if "triton" in (mta_chosen or []) and dev != "cuda" and not triton_interpreted():
        # (compiled Triton needs a GPU: on the CPU it died in Triton's driver lookup with a traceback)
        raise SigmaError(f"MTA backend 'triton' needs a CUDA GPU (have on {dev}: cpu, reference; TRITON_INTERPRET=1 "
                         "runs the kernel interpreted, slowly)")
    if "triton" in (mta_chosen or []) and not _mta_triton_shapes_ok(heads, head_dim):
        raise SigmaError("the Triton MTA kernel needs a power-of-two number of heads and head dim >= 16")
    kernel = parse_grid(mta_kernel, "--mta-kernel", form="QxK", example="6x11")
    out = output_picture(out, clips=False)  # a folder or x.jpg fails here, not after the timings
    warn_slow_half(DTYPES[dtype], dev, f"--dtype {dtype}")
    cfg = BenchConfig(grids=grids, heads=heads, head_dim=head_dim, cube=cube_t, top_n=top_n, radius=radius_t,
                      compress=compress, dtype=dtype, device=dev, backward=backward, repeats=repeats, backends=chosen,
                      mta=mta, mta_kernel=kernel, mta_backends=mta_chosen, reference_max_tokens=reference_max_tokens)
    release_notes()  # the timings begin: a slow-dtype warning held until the end would come after the wait it explains
    from rich.console import Console
    from rich.progress import Progress

    # on stderr (stdout: the results only), and on a terminal only: a transient bar leaves a blank line elsewhere
    console = Console(stderr=True)
    with Progress(transient=True, disable=as_json or not console.is_terminal, console=console) as bar:
        task = bar.add_task("bench-attn", total=len(grids))
        result = run(cfg, on_grid=lambda g: bar.advance(task))
    rows = result["rows"]
    names = list(rows[-1]["methods"])
    modes = ["forward"] + (["forward_backward"] if backward else [])
    label = {"forward": "fwd", "forward_backward": "fwd+bwd"}
    panels = [{"title": f"{label[m]} time, {dtype} on {dev}", "ylabel": "s",
               "series": {n: ([(r["tokens"], r["methods"][n][f"{m}_s"]) for r in rows if f"{m}_s" in r["methods"].get(n, {})], i, False)
                          for i, n in enumerate(names)}} for m in modes]
    panels.append({"title": "speed-up over SDPA (hollow: fwd+bwd)", "ylabel": "x", "hline": 1.0, "series": {
        f"{n} {label[m]}": ([(r["tokens"], r["methods"][n][f"{m}_speedup"]) for r in rows if f"{m}_speedup" in r["methods"].get(n, {})],
                            i, m != "forward")
        for i, n in enumerate(names) if n != "sdpa" for m in modes}})
    result["plot"] = str(save_plot(panels, out))

    lines = ["check against the reference (relative error, grid of 2x2x2 cubes):"]
    for b, errs in result["check"].items():
        lines.append(f"  {b if b.startswith('mta') else 'nsa-' + b}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    head = f"{'tokens':>8} {'method':<14} {'fwd ms':>9} {'x':>6} {'peak MB':>8}"
    if backward:
        head += f" {'fwd+bwd ms':>11} {'x':>6} {'peak MB':>8}"
    lines.append(head)
    for r in rows:
        for n, e in r["methods"].items():
            mem = lambda v: f"{v:8.0f}" if v is not None else f"{'-':>8}"  # noqa: E731
            line = f"{r['tokens']:>8} {n:<14} {e['forward_s'] * 1e3:9.1f} {e['forward_speedup']:6.2f} {mem(e['forward_peak_mb'])}"
            if "forward_backward_s" in e:
                line += f" {e['forward_backward_s'] * 1e3:11.1f} {e['forward_backward_speedup']:6.2f} {mem(e['forward_backward_peak_mb'])}"
            lines.append(line)
    for n, be in result["break_even_tokens"].items():
        lines.append(f"break-even vs SDPA, {n}: " + ", ".join(f"{k.replace('_speedup', '')} {v}" for k, v in be.items()))
    lines.append(f"plot: {result['plot']}")
    emit(result, as_json, lines)


def _mta_triton_shapes_ok(heads: int, head_dim: int) -> bool:
    from kernels.mta.triton import shapes_ok  # imported here: triton is optional

    return shapes_ok(heads, head_dim)
