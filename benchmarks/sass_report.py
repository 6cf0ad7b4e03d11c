"""What ptxas made of the sm90 kernels, without a GPU: per kernel (instantiation x mask variant)
the instructions of the wgmma region (first to last HGMMA, about the main loop), the local-memory
spills there (LDL / STL), the full wgmma waits (`WARPGROUP.DEPBAR.LE gsb0, 0x0`) and the MUFU
count, plus every ptxas "Potential Performance Loss" message (C75xx: wgmma serialized -- the
whole kernel then waits after every wgmma). Read it before spending GPU time on a kernel change:
a serialized or spilling build measured 13-19% slower (benchmarks/NOTES.md, sm90 backward steps
10 and 13).

    python benchmarks/sass_report.py                      # every sm90 instantiation
    python benchmarks/sass_report.py bwd_sm90_bf16_hd128  # some of them
    python benchmarks/sass_report.py --define BWD_TIMING_SKIP_ELEMENTWISE=1 bwd_sm90_bf16_hd128
"""
import argparse
import concurrent.futures
import os
import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
              "-gencode", "arch=compute_90a,code=sm_90a", "-DFAT_SM90", "-Xptxas", "-v"]
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);")


def compile_one(name, defines, out_dir):
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    obj = out_dir / f"{name}.o"
    flags = NVCC_FLAGS + [f"-DFAT_{d}" for d in defines]
    build = subprocess.run([nvcc, *flags, "-c", str(ROOT / "csrc" / "instantiations" / f"{name}.cu"), "-o", str(obj)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise RuntimeError(f"{name}: nvcc failed\n{build.stderr[-3000:]}")
    sass = subprocess.run(["cuobjdump", "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    return build.stdout + build.stderr, sass


def kernel_rows(sass):
    """(short kernel name, stats) per function of the SASS dump."""
    for function in re.split(r"\n\s+Function : ", sass)[1:]:
        name = function.split("\n", 1)[0]
        code = [m.group(1) for m in map(INSTRUCTION.match, function.split("\n")) if m]
        mma = [i for i, ins in enumerate(code) if "HGMMA" in ins]
        if not mma:
            continue
        region = code[mma[0]:mma[-1] + 1]
        count = lambda pattern: sum(1 for ins in region if re.search(pattern, ins))  # noqa: E731
        mask = re.search(r"KeyMaskILb(\d)ELb(\d)EE", name)
        label = {"00": "plain", "10": "causal", "01": "local"}.get("".join(mask.groups()) if mask else "", "?")
        # the flags after the mask, in order: Variant's Softcap, Alibi, Dropout, Combined, then the
        # sm90 forward's kPaged
        flags = re.findall(r"Lb(\d)E", name[mask.end():]) if mask else []
        for flag, feature in zip(flags, ("softcap", "alibi", "dropout", "combined", "paged")):
            if flag == "1":
                label += "+" + feature
        yield label, dict(instructions=len(region), ldl=count(r"\bLDL"), stl=count(r"\bSTL"),
                          full_waits=sum(1 for ins in code if "DEPBAR.LE gsb0, 0x0" in ins), mufu=count(r"\bMUFU"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="instantiation files (csrc/instantiations/NAME.cu); default: sm90")
    parser.add_argument("--define", action="append", default=[], help="a build switch, e.g. PINGPONG=0")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.stem for p in (ROOT / "csrc" / "instantiations").glob("*_sm90_*.cu"))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        results = dict(zip(names, pool.map(lambda n: compile_one(n, args.define, Path(tmp)), names)))
    print(f"{'instantiation':<22} {'variant':<14} {'region instr':>12} {'LDL':>4} {'STL':>4} {'full waits':>10} {'MUFU':>5}")
    for name, (log, sass) in results.items():
        for label, s in kernel_rows(sass):
            print(f"{name:<22} {label:<14} {s['instructions']:>12} {s['ldl']:>4} {s['stl']:>4} {s['full_waits']:>10} "
                  f"{s['mufu']:>5}")
        for message in sorted(set(re.findall(r"\(C75\d\d\)[^']*", log))):
            print(f"  ptxas: {message.strip()}")


if __name__ == "__main__":
    main()
