"""Builds flash_attn_t._C: the CUDA kernels under csrc/ plus the torch bindings.

Build knobs (environment variables):
  TORCH_CUDA_ARCH_LIST  architectures, default "8.0;9.0a" (sm80 kernels run on every arch listed;
                        Hopper needs its own sm_90a build, sm_80 machine code does not run there)
  MAX_JOBS              parallel compile jobs (ninja), honoured by torch's BuildExtension
  NVCC_THREADS          nvcc --threads per job (gencode targets compiled in parallel), default 2
  CUDA_HOME             the CUDA toolkit; defaults to /usr/local/cuda when that exists
  FLASH_ATTN_T_TENSOR_ROW_SUM  1 (default): the sm80 forward's softmax row sum on the tensor
                        cores; 0: on the FP32 pipe (for the ablation in benchmarks/NOTES.md)
  FLASH_ATTN_T_SM90_TENSOR_ROW_SUM  0 (default): the sm90 forward sums rows on the FP32 pipe;
                        1: as a P x ones wgmma (slower there, benchmarks/NOTES.md)
  FLASH_ATTN_T_LAZY_RESCALE    1 (default): the sm90 forward rescales O only when a row's max grows
                        by more than 2^8; 0: whenever it grows (ablation)
  FLASH_ATTN_T_PINGPONG        1 (default): the sm90 forward's two consumer warpgroups take turns
                        issuing their GEMMs; 0: each issues as soon as it can (ablation)
  FLASH_ATTN_T_SM90_HD64_WARPGROUPS  3 (default): consumer warpgroups of the sm90 hd64 forward
                        (64 query rows each); 2 for the ablation
  FLASH_ATTN_T_TIMING_SKIP_SOFTMAX  0 (default); 1 builds an sm90 forward WITHOUT its softmax, for
                        timing the softmax's exposed cost only: its output is wrong
  FLASH_ATTN_T_BWD_TIMING_SKIP_ELEMENTWISE  0 (default); 1 builds an sm90 backward WITHOUT its
                        per-element work (exp2, masks, dS), for timing only: its gradients are wrong
  FLASH_ATTN_T_BWD_TIMING_SKIP_DQ_REDUCE  0 (default); 1 builds an sm90 backward that never adds
                        into dQ (the L2 reductions skipped), for timing only: its dQ is wrong
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent
VERSION = "0.1.0"
# The compiled extension loads only with the torch release (major.minor) and CUDA major version it
# was built against: the wheel says so in its requirement and in a local version tag (as
# flash_attn's release wheels do), and flash_attn_t/build_info.py checks it at import.
TORCH_RELEASE = ".".join(torch.__version__.split("+")[0].split(".")[:2])
CUDA_TAG = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
LOCAL_VERSION = f"{VERSION}+{CUDA_TAG}torch{TORCH_RELEASE}"


def kernel_sources():
    """The one list of sources; CMakeLists.txt reads the same file."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().split()
    return [f"csrc/{name}" for name in lines]


def gencode_flags(arch_list):
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if not arch:
            continue
        num = arch.replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return flags


arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
# The sm90 (TMA + wgmma) forward needs the sm_90a target; without it Hopper runs the sm80 kernels.
sm90_flags = ["-DFAT_SM90"] if "9.0a" in arch_list else []
nvcc_flags = [
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    f"--threads={os.environ.get('NVCC_THREADS', '2')}",
    *gencode_flags(arch_list),
    *(f"-DFAT_{name}={int(os.environ.get(f'FLASH_ATTN_T_{name}', default))}"
      for name, default in (("TENSOR_ROW_SUM", 1), ("SM90_TENSOR_ROW_SUM", 0), ("LAZY_RESCALE", 1), ("PINGPONG", 1),
                            ("SM90_HD64_WARPGROUPS", 3), ("TIMING_SKIP_SOFTMAX", 0),
                            ("POLY_EXP2_SOFTCAP", 1),
                            ("BWD_TIMING_SKIP_ELEMENTWISE", 0), ("BWD_TIMING_SKIP_DQ_REDUCE", 0))),
    *sm90_flags,
]


# Environment variables that change what is built (MAX_JOBS only changes how fast): recorded, so
# that run.sh rebuilds when one of them differs from the last build's.
BUILD_KNOBS = ("TORCH_CUDA_ARCH_LIST", "NVCC_THREADS", "CUDA_HOME",
               *(f"FLASH_ATTN_T_{f.split('=')[0][len('-DFAT_'):]}" for f in nvcc_flags if f.startswith("-DFAT_") and "=" in f))


def write_build_config():
    """flash_attn_t/_build_config.py: what this build is, for build_info.check() and flash_attn_t.info."""
    switches = {f.split("=")[0][len("-DFAT_"):]: int(f.split("=")[1]) for f in nvcc_flags if f.startswith("-DFAT_")
                and "=" in f}
    build = {"version": LOCAL_VERSION, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "archs": arch_list, "sm90_kernels": bool(sm90_flags), "switches": switches,
             "environment": {knob: os.environ.get(knob) for knob in BUILD_KNOBS}}
    (ROOT / "flash_attn_t" / "_build_config.py").write_text(
        f"# Written by setup.py for the build of flash_attn_t._C next to it.\nBUILD = {build!r}\n")


class IncrementalBuildExtension(BuildExtension):
    """Compiles into build/ninja in the source tree, whatever directory pip hands the build (its
    editable and wheel builds get a new temporary one each time), and always lets ninja decide:
    it recompiles exactly the files whose source, included headers or flags changed (setuptools'
    own up-to-date test looks at the .cu files only, not at the headers they include)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / "ninja")
        self.force = True


# Before setup(): the wheel's build_py copies the package's .py files before build_ext runs.
write_build_config()
setup(
    name="flash-attn-t",
    version=LOCAL_VERSION,
    description="Exact fused attention for PyTorch with tensorized online softmax (FlashAttention-T)",
    packages=find_packages(include=["flash_attn_t", "flash_attn_t.*"]),
    ext_modules=[
        CUDAExtension(
            name="flash_attn_t._C",
            sources=kernel_sources(),
            extra_compile_args={"cxx": ["-O3", "-std=c++20", *sm90_flags], "nvcc": nvcc_flags},
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": IncrementalBuildExtension},
    python_requires=">=3.9",
    install_requires=[f"torch=={TORCH_RELEASE}.*"],
)
