"""Compile every Triton attention launch the kernel tests make for a GPU, with no GPU: the tests
run on the CPU through the interpreter while each launch's signature is recorded, then each
signature is compiled for sm_90 (through PTX and ptxas) by another Triton, such as the GPU
image's, installed beside the project with `pip install --no-deps --target DIR triton==X`.
A kernel that passes the interpreter can still fail a GPU compiler pass (e6926fb).

    python bench/cross_compile.py --triton /tmp/t36 [-k threshold] [tests/test_kernels.py ...]
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8", "int16": "i16", "int32": "i32",
         "int64": "i64", "float8_e4m3fn": "fp8e4nv", "bool": "i1", "uint8": "u8"}


def arg_type(x) -> str:
    """Triton's signature type of one launch argument."""
    import torch

    if isinstance(x, torch.Tensor):
        return "*" + TYPES[str(x.dtype).removeprefix("torch.")]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -2 ** 31 <= x < 2 ** 31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(x).__name__}")


def record(pytest_args: list[str], out: Path) -> None:
    """Run the tests (interpreted) and write each distinct launch's kernel, signature, constexprs and warps."""
    import pytest

    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    from minirt.kernels import triton_attention as tri

    seen: dict[str, dict] = {}
    launch = tri._launch

    def recording(kernel, grid, *args, **meta):
        names = list(inspect.signature(kernel.fn).parameters)
        warps = meta.get("num_warps", 4)
        constexprs = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}
        constexprs.pop("INTERP", None)  # the GPU build is never interpreted
        constexprs.update({k: False for k in ("INTERP", "UPCAST") if k in names})
        entry = {"kernel": kernel.fn.__name__, "warps": warps, "constexprs": constexprs,
                 "signature": {name: arg_type(a) for name, a in zip(names, args)}}
        seen.setdefault(json.dumps(entry, sort_keys=True), entry)
        return launch(kernel, grid, *args, **meta)

    tri._launch = recording
    code = pytest.main(["-q", "-p", "no:cacheprovider", *pytest_args])
    out.write_text(json.dumps(list(seen.values())))
    print(f"{len(seen)} distinct launches recorded (pytest exit {code})")


def compile_all(launches: Path) -> int:
    """Compile each recorded launch for sm_90 with the Triton first on sys.path; the failures' count."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    from minirt.kernels import triton_attention as tri

    failed = 0
    for entry in json.loads(launches.read_text()):
        fn = getattr(tri, entry["kernel"])
        constexprs = {k: v for k, v in entry["constexprs"].items() if k in fn.arg_names}
        signature = {**entry["signature"], **{k: "constexpr" for k in constexprs}}
        try:
            triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": entry["warps"]})
        except Exception as e:  # noqa: BLE001  report every failing signature, then fail
            failed += 1
            print(f"FAILED {entry['kernel']} {json.dumps(entry['signature'])} {constexprs}: "
                  f"{str(e).splitlines()[-1] if str(e) else type(e).__name__}")
    print(f"Triton {triton.__version__}: {len(json.loads(launches.read_text())) - failed} compiled, {failed} failed")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", required=True, help="a folder holding the Triton to compile with")
    ap.add_argument("--compile", type=Path, help=argparse.SUPPRESS)  # the second stage, run in a subprocess
    args, pytest_args = ap.parse_known_args()
    if args.compile:
        sys.exit(1 if compile_all(args.compile) else 0)
    with tempfile.TemporaryDirectory() as tmp:
        launches = Path(tmp) / "launches.json"
        record(pytest_args or ["tests/test_kernels.py", "tests/test_sparse.py"], launches)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([args.triton, str(ROOT), env.get("PYTHONPATH", "")])
        sys.exit(subprocess.run([sys.executable, __file__, "--triton", args.triton, "--compile", str(launches)],
                                env=env).returncode)


if __name__ == "__main__":
    main()
