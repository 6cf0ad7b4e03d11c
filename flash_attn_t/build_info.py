"""What the compiled extension (flash_attn_t._C) was built against, and the check that the running
torch can load it.

setup.py records the build in flash_attn_t/_build_config.py (not in the repository: it is written by
every build). A compiled extension only loads with the torch release (major.minor) and the CUDA
major version it was built against; with another one the loader fails with an undefined symbol.
`check()` turns that into an ImportError that says which versions differ and how to rebuild.
"""
import torch

try:
    from ._build_config import BUILD
except ImportError:  # a source tree that was never built
    BUILD = None

REBUILD_COMMAND = "pip install --no-build-isolation --no-deps -e ."  # run in the source tree


def torch_release(version):
    """'2.14.1+cu130' -> '2.14': the part of a torch version its C++ ABI follows."""
    return ".".join(version.split("+")[0].split(".")[:2])


def cuda_major(version):
    return version.split(".")[0] if version else None


def mismatch(build, torch_version, torch_cuda):
    """None if an extension built as `build` records loads under this torch; else the reason."""
    if build is None:
        return None
    same_torch = torch_release(build["torch"]) == torch_release(torch_version)
    same_cuda = cuda_major(build["torch_cuda"]) == cuda_major(torch_cuda)
    if same_torch and same_cuda:
        return None
    return (f"flash_attn_t was built against torch {build['torch']} (CUDA {build['torch_cuda']}), but torch "
            f"{torch_version} (CUDA {torch_cuda}) is installed: its compiled kernels cannot load with it. Rebuild "
            f"them for this torch with `{REBUILD_COMMAND}` in the flash-attn-t source tree, or install torch {torch_release(build['torch'])}.* "
            f"with CUDA {cuda_major(build['torch_cuda'])}.")


def built_with(environ):
    """Whether the recorded build used these build knobs (setup.py's BUILD_KNOBS) exactly."""
    return BUILD is not None and all(environ.get(knob) == value for knob, value in BUILD["environment"].items())


def check():
    """Raises ImportError if the recorded build does not match the running torch."""
    reason = mismatch(BUILD, torch.__version__, torch.version.cuda)
    if reason is not None:
        raise ImportError(reason)
