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
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"  # before torch.utils.cpp_extension reads it

from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent


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
                            ("BWD_TIMING_SKIP_ELEMENTWISE", 0))),
    *sm90_flags,
]

setup(
    name="flash-attn-t",
    version="0.1.0",
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
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch"],
)
