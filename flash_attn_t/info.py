"""What a bug report needs: `python -m flash_attn_t.info` prints the package and its build, the
running torch / CUDA / driver, and for each visible GPU which kernel family its forward and
backward run on. `collect()` returns the same as a dict. (A build for another torch release
stops at the package import already, with the two versions in the message: build_info.check.)"""
import os
import platform
import sys

import torch

from . import __version__, build_info


def _compiled_archs(archs):
    """'8.0;9.0a' -> [(8, 0, False), (9, 0, True)]: (major, minor, arch-specific 'a' target)."""
    out = []
    for arch in archs.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if arch:
            major, minor = arch.rstrip("a").split(".")
            out.append((int(major), int(minor), arch.endswith("a")))
    return out


def kernel_family(capability, build, environ=os.environ):
    """The kernels a GPU of this compute capability runs, forward and backward alike (the choice
    csrc/flash_api.cpp's use_sm90_kernels makes at run time)."""
    if build is None:
        return "none: flash_attn_t._C is not built"
    major, minor = capability
    if major < 8:
        return "none: the kernels need compute capability 8.0 or newer"
    # Machine code for sm_XY runs on the same major version from minor Y on; 'a' targets only on XY.
    runs = [(a_major, a_minor, exact) for a_major, a_minor, exact in _compiled_archs(build["archs"])
            if a_major == major and (a_minor == minor if exact else a_minor <= minor)]
    if not runs:
        return (f"none: this build has no machine code for sm_{major}{minor} (archs {build['archs']}; "
                "rebuild with it in TORCH_CUDA_ARCH_LIST)")
    if (major, minor) == (9, 0) and build["sm90_kernels"]:
        if environ.get("FLASH_ATTN_T_FORCE_SM80") == "1":
            return "sm80 (mma.sync), forced by FLASH_ATTN_T_FORCE_SM80=1"
        return "sm90 (TMA + wgmma)"
    return "sm80 (mma.sync)"


def _driver_version():
    try:
        version = torch._C._cuda_getDriverVersion()  # e.g. 13000 for 13.0
        return f"{version // 1000}.{version % 1000 // 10}"
    except Exception:  # a CPU build of torch, or no driver
        return None


def collect():
    build = build_info.BUILD
    info = {
        "flash_attn_t": __version__,
        "build": build,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": _driver_version(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            capability = (props.major, props.minor)
            info["gpus"].append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                 "memory_gib": round(props.total_memory / 2**30, 1),
                                 "kernels": kernel_family(capability, build)})
    return info


def report():
    info = collect()
    build = info["build"]
    lines = [f"flash_attn_t {info['flash_attn_t']}"]
    if build is None:
        lines.append("  build: flash_attn_t._C is not built (pip install --no-build-isolation --no-deps -e .)")
    else:
        switches = ", ".join(f"{k}={v}" for k, v in build["switches"].items())
        lines += [f"  build: {build['version']}, torch {build['torch']} (CUDA {build['torch_cuda']}), "
                  f"archs {build['archs']}",
                  f"  build switches: {switches}"]
    lines += [f"python {info['python']} on {info['platform']}",
              f"torch {info['torch']}, CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}, driver {info['driver']}"]
    if not info["gpus"]:
        lines.append("no CUDA GPU visible: the kernels cannot run here; "
                     "flash_attn_t.reference.attention_reference computes the same attention on the CPU")
    for gpu in info["gpus"]:
        lines.append(f"GPU {gpu['index']}: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB): "
                     f"forward and backward kernels {gpu['kernels']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
