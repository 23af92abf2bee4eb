"""Build moe-kernels.

The Triton kernels need no build step. The C++/CUDA extension ``moe_kernels._C`` (csrc/) is compiled when

  * torch is a CUDA build, and
  * the CUDA toolkit is found: $CUDA_HOME or $CUDA_PATH, else /usr/local/cuda, else the toolkit behind `nvcc` on
    PATH (followed through wrapper scripts, whose own directory is not the toolkit), and
  * the toolkit's major version is torch's (a minor mismatch only warns).

Otherwise the package installs without it and prints one line saying why; ``moe_kernels.has_extension()`` and
``moe-kernels info`` tell at run time, and the ops fall back to PyTorch.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) so that the extension is compiled against the
torch you run, not a fresh one pip would fetch into an isolated build environment. Nothing is downloaded here.

Environment:
  TORCH_CUDA_ARCH_LIST   target architectures, e.g. "9.0a;10.0a" (default: sm_90a only, i.e. Hopper)
  MAX_JOBS               parallel compile jobs for ninja (torch reads it; default: all cores)
  MOE_KERNELS_SKIP_EXT=1 install without the extension
"""
import glob
import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def has_nvcc(cuda_home):
    return bool(cuda_home) and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc"))


def find_cuda_home():
    """The CUDA toolkit root (the directory holding bin/nvcc), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if has_nvcc(os.environ.get(var)):
            return os.environ[var]
    if has_nvcc("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # A symlink resolves; a wrapper script (`exec /opt/cuda-x/bin/nvcc "$@"`) does not, so also take every
    # .../bin/nvcc path the script names. The first candidate that holds bin/nvcc wins.
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        with open(nvcc, "rb") as f:
            text = f.read(16384).decode("utf-8", "ignore")
        named = re.findall(r"[\w./+-]*/bin/nvcc\b", text)
        candidates = [os.path.dirname(os.path.dirname(p)) for p in named] + candidates
    except OSError:
        pass
    return next((c for c in candidates if has_nvcc(c)), None)


def nvcc_version(cuda_home):
    """'13.0' from `nvcc --version`, or None."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def nvidia_wheel_includes(torch_dir):
    """Include dirs of pip's nvidia-* wheels: torch's CUDA headers pull in e.g. cusparse.h, which lives in
    site-packages/nvidia/cu13/include when the toolkit on disk lacks it."""
    roots = [os.path.dirname(torch_dir)] + site.getsitepackages() + [site.getusersitepackages()] + sys.path
    dirs = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in dirs:
                dirs.append(inc)
    return dirs


def skip(reason):
    print(f"moe-kernels: building without the C++/CUDA extension: {reason}")
    return [], {}


def extension_modules():
    """([CUDAExtension], cmdclass), or ([], {}) after printing why not."""
    if os.environ.get("MOE_KERNELS_SKIP_EXT") == "1":
        return skip("MOE_KERNELS_SKIP_EXT=1")
    try:
        import torch
    except ImportError:
        return skip("torch is not importable here (install torch first, then pip install --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return skip("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    version = nvcc_version(cuda_home)
    if version is None:
        return skip(f"could not read the version of {cuda_home}/bin/nvcc")
    if version.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's own check would raise in the middle of the build; say it here instead
        return skip(f"nvcc {version} ({cuda_home}) and torch's CUDA {torch.version.cuda} differ in major version")

    # torch.utils.cpp_extension guessed CUDA_HOME at import time from `which nvcc`, which is wrong for a wrapper
    # script: set both the environment and the module attribute it already read.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home

    nvcc_flags = ["-O3", "-lineinfo"]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        arch = f"TORCH_CUDA_ARCH_LIST={arch_list}"  # torch turns it into -gencode flags
    else:
        # sm_90a (arch-specific Hopper features such as wgmma); torch adds no arch flags of its own when it sees one
        nvcc_flags.append("-gencode=arch=compute_90a,code=sm_90a")
        arch = "sm_90a"
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    print(f"moe-kernels: building moe_kernels._C with nvcc {version} from {cuda_home} for {arch}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', 'all cores')}")
    ext = cpp_extension.CUDAExtension(
        name="moe_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_includes(os.path.dirname(torch.__file__)),
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},  # torch adds -std=c++17 and its ABI flags
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

# Name, version, dependencies and the console script are in pyproject.toml.
setup(
    packages=find_packages(include=["moe_kernels", "moe_kernels.*"]),
    package_data={"moe_kernels": ["ops/configs/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
