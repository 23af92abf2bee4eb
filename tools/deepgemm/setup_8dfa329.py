"""Lay out DeepGEMM 8dfa329 (mid-2025, pure-Python JIT: no C++ build) for import, offline.

    python tools/deepgemm/setup_8dfa329.py ANCHORS DEST [--wheels]   # e.g. .anchors /tmp/dg_8dfa329
    export PYTHONPATH=DEST/src[:DEST/site]:$PYTHONPATH                # what it prints last

ANCHORS (the anchors copy, see /work/shared/anchors/README.md) must hold:
  src/DeepGEMM_8dfa329/   deepseek-ai/DeepGEMM at 8dfa329 (deep_gemm/ only: Python + .cuh headers)
  src/DeepGEMM/third-party/cutlass/include/{cute,cutlass}   CUTLASS headers (2.6.1's pin f3fde58; 8dfa329 pinned
                          eefa171, an older 3.x: its kernels compile with the newer cute under nvcc 13.0)
  wheels/cuda_bindings-12.9.*-cp3XX-*.whl, wheels/cuda_pathfinder-*.whl   (the JIT loads cubins through cuda-python)
What it does: copies deep_gemm/ to DEST/src (the anchors copy stays clean), links cute/ and cutlass/ into
deep_gemm/include (the JIT passes only that directory to nvcc), unpacks the wheels into DEST/site (only where
cuda-python does not import, or always with --wheels: cuda-bindings 12.9, the API 8dfa329 was written against,
then shadows an installed 13.x when DEST/site comes first on PYTHONPATH), and makes the
runtime find cuobjdump (it reads the cubin's kernel name with it) in $CUDA_HOME/bin, else on PATH, else the one
triton ships. Exit 1 with the reason when something is missing.
"""
import glob
import os
import shutil
import sys
import zipfile

CUOBJDUMP_FINDER = '''

def _cuobjdump() -> str:
    """$CUDA_HOME/bin/cuobjdump, else cuobjdump on PATH, else triton's bundled copy (setup_8dfa329.py)."""
    import shutil as _sh
    for cand in (os.path.join(CUDA_HOME or '', 'bin', 'cuobjdump'), _sh.which('cuobjdump') or ''):
        if cand and os.path.exists(cand):
            return cand
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
'''


def fail(msg):
    print(f"setup_8dfa329: {msg}")
    sys.exit(1)


def patch(path, old, new, append=""):
    with open(path) as f:
        text = f.read()
    if old not in text:
        fail(f"{path}: expected text not found: {old!r}")
    with open(path, "w") as f:
        f.write(text.replace(old, new) + append)


def main(argv):
    force = "--wheels" in argv
    argv = [a for a in argv if a != "--wheels"]
    if len(argv) != 3:
        print(__doc__)
        return 2
    anchors, dest = os.path.abspath(argv[1]), os.path.abspath(argv[2])
    src = os.path.join(anchors, "src", "DeepGEMM_8dfa329", "deep_gemm")
    cut = os.path.join(anchors, "src", "DeepGEMM", "third-party", "cutlass", "include")
    if not os.path.isdir(src):
        fail(f"{src} is missing")
    for name in ("cute", "cutlass"):
        if not os.path.isdir(os.path.join(cut, name)):
            fail(f"{cut}/{name} is missing")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = glob.glob(os.path.join(anchors, "wheels", f"cuda_bindings-*-{tag}-*.whl"))
    wheels += glob.glob(os.path.join(anchors, "wheels", "cuda_pathfinder-*.whl"))
    shutil.rmtree(dest, ignore_errors=True)
    pkg = os.path.join(dest, "src", "deep_gemm")
    shutil.copytree(src, pkg)
    for d, _, files in os.walk(pkg):  # the anchors copy may be read-only; this one gets links and a patch
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    for name in ("cute", "cutlass"):
        os.symlink(os.path.join(cut, name), os.path.join(pkg, "include", name))
    try:
        if force:
            raise ImportError("--wheels")
        import cuda.bindings.driver  # noqa: F401
        print(f"setup_8dfa329: cuda-python {cuda.bindings.__version__} already importable; wheels not unpacked")
        site = ""
    except ImportError:
        site = f":{dest}/site"
        if not any("cuda_bindings" in w for w in wheels):
            fail(f"no cuda_bindings wheel for {tag} in {anchors}/wheels ({'--wheels' if force else 'cuda-python does not import'})")
        for w in wheels:
            with zipfile.ZipFile(w) as z:
                z.extractall(os.path.join(dest, "site"))
            print(f"setup_8dfa329: unpacked {os.path.basename(w)}")
    rt = os.path.join(pkg, "jit", "runtime.py")
    patch(rt, "command = [f'{CUDA_HOME}/bin/cuobjdump', '-symbols', path]",
          "command = [_cuobjdump(), '-symbols', path]", CUOBJDUMP_FINDER)
    print(f"PYTHONPATH={dest}/src{site}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
