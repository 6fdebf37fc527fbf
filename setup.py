"""Builds taskrouting._C: the C++ CPU kernels always, the CUDA kernels when possible.

TASKROUTING_BUILD_CUDA: unset/"auto" builds CUDA when torch is a CUDA build and nvcc is found,
"0" never, "1" always (fails with a clear error when it cannot). CUDA_HOME defaults to
/usr/local/cuda when that exists. TASKROUTING_CPU_FLAGS overrides the CPU ISA flags.
Build with `pip install --no-build-isolation .` so the build uses the installed torch.
"""
import glob
import os
import platform
import sys

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # /usr/local/bin/nvcc may be a wrapper script

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    mode = os.environ.get("TASKROUTING_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"TASKROUTING_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if mode == "1" and reasons:
        sys.exit("TASKROUTING_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        print("taskrouting: building without CUDA kernels: " + "; ".join(reasons))
    return not reasons


def cpu_isa_flags() -> list:
    """AVX-512 or AVX2 when the build machine has them (the extension is built where it runs)."""
    if "TASKROUTING_CPU_FLAGS" in os.environ:
        return os.environ["TASKROUTING_CPU_FLAGS"].split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return []
    if all(f" {flag}" in flags for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c")):
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
    if all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def nvidia_include_dirs(cuda_include: str) -> list:
    """Include dirs of the nvidia-* wheels that come with a CUDA torch which hold a header the toolkit lacks.

    ATen's CUDA headers include cublas_v2.h, cusparse.h and cusolverDn.h, which a toolkit without the math
    libraries lacks; the wheels have them. But a wheel's copy of a header the toolkit also has (the CUDA
    runtime's, cccl's) is from the CUDA that torch was built with, not from this nvcc, and mixing the two
    breaks the build. So a wheel dir whose headers the toolkit all has is left out, and extension() puts
    the others after the toolkit's include dir, so that they only fill in what it lacks.
    """
    def provides_missing(d: str) -> bool:
        for root, _, files in os.walk(d):
            for name in files:
                if name.endswith((".py", ".pyc")):  # the wheels' namespace-package files
                    continue
                if not os.path.exists(os.path.join(cuda_include, os.path.relpath(os.path.join(root, name), d))):
                    return True
        return False

    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d) and provides_missing(d)))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # No -std here: torch's cpp_extension adds -std=c++20 (2.14's ATen headers require C++20).
    cxx = ["-O3", "-fopenmp"] + cpu_isa_flags()
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        # The toolkit's include dir first: nvcc and cpp_extension add it only after these.
        cuda_include = os.path.join(cpp_extension.CUDA_HOME, "include")
        include_dirs = kwargs["include_dirs"] + [cuda_include] + nvidia_include_dirs(cuda_include)
        return cpp_extension.CUDAExtension(
            "taskrouting._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **{**kwargs, "include_dirs": include_dirs})
    return cpp_extension.CppExtension("taskrouting._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
