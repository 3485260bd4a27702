"""Compile Triton attention launches for a GPU, with no GPU: the launches run on the CPU through
the interpreter while each one's kernel, arguments, constexprs, warps and stages are recorded,
then each is compiled for sm_90 (through PTX and ptxas) by another Triton, such as the GPU
image's, installed beside the project with `pip install --no-deps --target DIR triton==X`, with
the specialization its JIT would make (integers equal to 1 as constants, 16-divisible integers
and 16-byte aligned pointers marked so). A kernel that passes the interpreter can still fail a
GPU compiler pass (e6926fb).

    python bench/cross_compile.py --triton /tmp/t36 [-k threshold] [tests/test_kernels.py ...]
    python bench/cross_compile.py --triton /tmp/t36 --sass 32,4,bf16 [--lines 12]

The first compiles every launch the kernel tests make. --sass HQ,HKV,DTYPE instead records one
certified int8-threshold step (page_threshold, then page_filtered_attention) at that head shape
and prints, per kernel, its registers, spills and shared memory, and the instructions of its
longest loop by source line (nvdisasm): how to see where a kernel's time could go before
spending device time on it.
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8", "int16": "i16", "int32": "i32",
         "int64": "i64", "float8_e4m3fn": "fp8e4nv", "bool": "i1", "uint8": "u8"}


def arg_spec(x) -> dict:
    """What the compiler needs of one launch argument: its type, an integer's value, a pointer's alignment."""
    import torch

    if isinstance(x, torch.Tensor):
        return {"type": "*" + TYPES[str(x.dtype).removeprefix("torch.")], "aligned": x.data_ptr() % 16 == 0}
    if isinstance(x, bool):
        return {"type": "i1"}
    if isinstance(x, int):  # a stand-in of the same specialization: 1, a multiple of 16 or not, 32 or 64 bits
        wide = 0 if -2 ** 31 <= x < 2 ** 31 else 2 ** 40
        return {"type": "int", "value": 1 if x == 1 else wide + (16 if x % 16 == 0 else 3)}
    if isinstance(x, float):
        return {"type": "fp32"}
    raise TypeError(f"no Triton type for {type(x).__name__}")


def recording(seen: dict):
    """Patch triton_attention's launcher so that each distinct launch is added to seen, then runs."""
    from minirt.kernels import triton_attention as tri

    launch = tri._launch

    def record_launch(kernel, grid, *args, **meta):
        names = list(inspect.signature(kernel.fn).parameters)
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        constexprs.update({k: False for k in ("INTERP", "UPCAST") if k in names})  # the GPU build is never interpreted
        entry = {"kernel": kernel.fn.__name__, "warps": meta.get("num_warps", 4), "stages": meta.get("num_stages", 3),
                 "constexprs": constexprs, "args": {name: arg_spec(a) for name, a in zip(names, args)}}
        seen.setdefault(json.dumps(entry, sort_keys=True), entry)
        return launch(kernel, grid, *args, **meta)

    tri._launch = record_launch


def record_tests(pytest_args: list[str], out: Path) -> None:
    """Run the tests (interpreted) and write each distinct launch."""
    import pytest

    seen: dict[str, dict] = {}
    recording(seen)
    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])
    out.write_text(json.dumps(list(seen.values())))
    print(f"{len(seen)} distinct launches recorded (pytest exit {code})")


def record_step(shape: str, out: Path) -> None:
    """Run one certified int8-threshold step (eps 1e-2, page size 1, 2048 cached keys of 64 dims,
    anchor 4, window 128) at HQ,HKV,DTYPE, interpreted, and write its launches."""
    import torch

    from minirt.kernels import reference as ref
    from minirt.kernels import triton_attention as tri

    Hq, Hkv, dtype = int(shape.split(",")[0]), int(shape.split(",")[1]), getattr(torch, {
        "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[shape.split(",")[2]])
    n, D, W, anchor = 2048, 64, 128, 4
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, Hkv, n + 1, D, generator=g).to(dtype) for _ in range(2))
    kq, scale = ref.quantize_keys(k.float())
    chan, offset = torch.ones(1, Hkv, D), torch.zeros(1, Hkv, D)
    q = torch.randn(1, Hq, D, generator=g).to(dtype)
    ring_k, ring_v = torch.zeros(1, Hkv, W, D, dtype=dtype), torch.zeros(1, Hkv, W, D, dtype=dtype)
    bounds = ref.step_bounds(*ref.sparse_bounds(n, anchor, W), "cpu")
    seen: dict[str, dict] = {}
    recording(seen)
    page_bin, threshold, log_rest = tri.page_threshold(q, k, kq, scale, chan, offset, bounds, 1e-2, 1)
    tri.page_filtered_attention(q, ring_k, ring_v, k, v, page_bin, threshold, log_rest, bounds, anchor, 1)
    out.write_text(json.dumps(list(seen.values())))


def sass_report(compiled, entry: dict, lines: int) -> str:
    """Registers, spills, shared memory, and the instructions of the longest loop (else of the whole
    kernel) by source line."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([tools / "nvdisasm", "-c", "-g", f.name], capture_output=True, text=True,
                              check=True).stdout.splitlines()
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    labels = {line[:-1]: i for i, line in enumerate(sass) if re.match(r"^\.L_x_\d+:$", line)}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(sass)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i - 2]  # not the end's trap
    start, end = max(loops, key=lambda se: se[1] - se[0], default=(0, len(sass) - 1))
    every = sum(1 for line in sass if re.match(r"^\s+/\*[0-9a-f]+\*/\s+\S", line))
    source, by_line, ops = None, collections.Counter(), collections.Counter()
    for line in sass[start:end + 1]:
        if (m := re.search(r'//## File "(.*)", line (\d+)', line)):
            source = (m.group(1), int(m.group(2)))
        elif (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            by_line[source] += 1
            ops[m.group(1)] += 1
    texts: dict[str, list[str]] = {}
    sizes = ", ".join(f"{k}={v}" for k, v in entry["constexprs"].items() if k in ("G", "M", "CH", "S", "NB"))
    resources = " ".join(re.findall(r"REG:\d+|STACK:\d+|LOCAL:\d+", usage))
    out = [f"{entry['kernel']} ({entry['warps']} warps, {entry['stages']} stages, {sizes}): {resources}, shared "
           f"{compiled.metadata.shared} B; {every} instructions, "
           + (f"of which its longest loop {sum(by_line.values())}" if loops else "no loop")
           + f", {ops['BAR']} barriers in what is listed"]
    for where, count in by_line.most_common(lines):
        if where is None:
            out.append(f"  {count:5d}  (no line)")
            continue
        path, number = where
        text = texts.setdefault(path, Path(path).read_text().splitlines() if Path(path).exists() else [])
        code = text[number - 1].strip()[:80] if number <= len(text) else "?"
        out.append(f"  {count:5d}  {Path(path).name}:{number}: {code}")
    return "\n".join(out)


def compile_all(launches: Path, sass_lines: int | None) -> int:
    """Compile each recorded launch for sm_90 with the Triton first on sys.path; the failures' count."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from minirt.kernels import triton_attention as tri

    failed = 0
    for entry in json.loads(launches.read_text()):
        fn = getattr(tri, entry["kernel"])
        constexprs = {k: v for k, v in entry["constexprs"].items() if k in fn.arg_names}
        signature, attrs = {}, {}
        for i, (name, spec) in enumerate(entry["args"].items()):
            kind, hint = (spec["type"], "D" if spec.get("aligned") else "")
            if kind == "int":  # as the JIT specializes: 1 is a constant, a multiple of 16 is marked so
                kind, hint = native_specialize_impl(BaseBackend, spec["value"], False, True, True)
                if kind == "constexpr":
                    constexprs[name] = spec["value"]
            signature[name] = kind
            if hint == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({k: "constexpr" for k in constexprs})
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": entry["warps"], "num_stages": entry["stages"]})
            if sass_lines is not None:
                print(sass_report(compiled, entry, sass_lines))
        except Exception as e:  # noqa: BLE001  report every failing launch, then fail
            failed += 1
            print(f"FAILED {entry['kernel']} {json.dumps(entry['args'])} {constexprs}: "
                  f"{str(e).splitlines()[-1] if str(e) else type(e).__name__}")
    print(f"Triton {triton.__version__}: {len(json.loads(launches.read_text())) - failed} compiled, {failed} failed")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", required=True, help="a folder holding the Triton to compile with")
    ap.add_argument("--sass", metavar="HQ,HKV,DTYPE", help="one certified step's launches, with their SASS")
    ap.add_argument("--lines", type=int, default=12, help="source lines listed per kernel with --sass")
    ap.add_argument("--compile", type=Path, help=argparse.SUPPRESS)  # the second stage, run in a subprocess
    args, pytest_args = ap.parse_known_args()
    if args.compile:
        sys.exit(1 if compile_all(args.compile, args.lines if args.sass else None) else 0)
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        launches = Path(tmp) / "launches.json"
        if args.sass:
            record_step(args.sass, launches)
        else:
            record_tests(pytest_args or ["tests/test_kernels.py", "tests/test_sparse.py"], launches)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([args.triton, str(ROOT), env.get("PYTHONPATH", "")])
        second = [sys.executable, __file__, "--triton", args.triton, "--compile", str(launches), "--lines",
                  str(args.lines)] + (["--sass", args.sass] if args.sass else [])
        sys.exit(subprocess.run(second, env=env).returncode)


if __name__ == "__main__":
    main()
