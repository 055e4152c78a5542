"""cffi (API mode) builders for the tinyzq C kernels: one extension module per ISA level.

Every module is a unity build of the same sources (csrc/*.c are #included into the module's
generated C file), compiled with its own flags and one macro selecting the variant:

  x86_64:   tinyzq._tzq_ref     -O3 -std=c99 only (runs on any x86-64)
            tinyzq._tzq_avx2    + -mavx2 -mfma -mf16c                       (TZQ_ISA_AVX2)
            tinyzq._tzq_avx512  + -mavx512f -mavx512bw -mavx512vl -mavx512vnni (TZQ_ISA_AVX512)
  aarch64:  tinyzq._tzq_ref     -O3 -std=c99 only
            tinyzq._tzq_neon    -march=armv8-a                              (TZQ_ISA_NEON)
            tinyzq._tzq_dotprod -march=armv8.2-a+dotprod                    (TZQ_ISA_DOTPROD)
  other:    tinyzq._tzq_ref

A unity build gives every module its own object file (setuptools would otherwise compile the
shared sources of all modules to the same build/temp/csrc/*.o paths). tinyzq/kernels.py checks
the CPU (through _tzq_ref) before importing a SIMD module.

Usage:
  setup.py:              setup(cffi_modules=build_ext.cffi_modules(), cmdclass=build_ext.cmdclass())
  in-place dev build:    python build_ext.py        (writes tinyzq/_tzq_*.so next to the sources)
Environment:
  TINYZQ_BUILD_ISAS=ref,avx2   build only these modules (e.g. for a compiler without AVX-512 VNNI)
  TINYZQ_NO_INPLACE=1          do not also copy built modules into the source tree (see cmdclass)
"""

import os
import platform
import re
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
UNITY_SOURCES = ["cpu.c", "threads.c", "pack.c", "qgemm_ref.c", "qgemm_x86.c", "qgemm_arm.c", "rng.c", "membw.c", "attn.c",
                 "decode.c", "ops.c", "attn_prefill.c", "gemm16.c"]
HEADERS = ["tinyzq.h", "tzq_internal.h"]

_BASE_FLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-fvisibility=hidden"]
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_VARIANTS = {
    "x86_64": [
        ("ref", None, []),
        ("avx2", "TZQ_ISA_AVX2", _AVX2),
        ("avx512", "TZQ_ISA_AVX512", _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]),
    ],
    "aarch64": [
        ("ref", None, []),
        ("neon", "TZQ_ISA_NEON", ["-march=armv8-a"]),
        ("dotprod", "TZQ_ISA_DOTPROD", ["-march=armv8.2-a+dotprod"]),
    ],
    "other": [("ref", None, [])],
}


def machine():
    """'x86_64', 'aarch64' or 'other' for the machine we are building on."""
    m = platform.machine().lower()
    if m in ("x86_64", "amd64", "x64") and sys.maxsize > 2**32:
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8l") and sys.maxsize > 2**32:
        return "aarch64"
    return "other"


def _cdef():
    with open(os.path.join(HERE, CSRC, "tinyzq.h")) as f:
        text = f.read()
    m = re.search(r"/\* BEGIN CDEF \*/(.*)/\* END CDEF \*/", text, re.S)
    if m is None:
        raise RuntimeError("csrc/tinyzq.h: missing the BEGIN CDEF / END CDEF markers")
    return m.group(1)


def _variants():
    variants = _VARIANTS[machine()]
    if sys.platform == "win32":  # MSVC: no GCC-style flags, no pthreads: portable module only
        variants = [("ref", None, [])]
    only = os.environ.get("TINYZQ_BUILD_ISAS", "").strip()
    if only:
        wanted = {s.strip() for s in only.split(",") if s.strip()} | {"ref"}  # ref is always needed
        variants = [v for v in variants if v[0] in wanted]
    return variants


def _make_ffi(name, macro, flags, module=None, defines=()):
    """FFI of one variant: module tinyzq._tzq_<name> unless `module` is given (tests build
    throw-away modules with extra `defines`, e.g. TZQ_EMULATE_VNNI)."""
    ffi = FFI()
    ffi.cdef(_cdef())
    src = "".join(['#include "%s"\n' % s for s in UNITY_SOURCES])
    for d in ([macro] if macro else []) + list(defines):
        src = "#define %s 1\n%s" % (d, src)
    win = sys.platform == "win32"
    ffi.set_source(
        module or "tinyzq._tzq_" + name,
        src,
        include_dirs=[os.path.join(HERE, CSRC)],
        # relative (when building from the project root) so that setuptools also rebuilds on changes
        depends=[os.path.relpath(os.path.join(HERE, CSRC, f)) for f in UNITY_SOURCES + HEADERS],
        extra_compile_args=[] if win else _BASE_FLAGS + flags,
        libraries=[] if win else ["pthread", "m"],
    )
    return ffi


# module-level FFI objects named by cffi_modules() ("build_ext.py:ffi_avx2", ...)
for _name, _macro, _flags in _variants():
    globals()["ffi_" + _name] = _make_ffi(_name, _macro, _flags)


def cffi_modules():
    """The cffi_modules entries for setup() on this platform, e.g. ['build_ext.py:ffi_ref', ...]."""
    return ["build_ext.py:ffi_" + name for name, _, _ in _variants()]


def _remove_stale(dest):
    """Remove other builds of the same module next to `dest` (e.g. a .cpython-311-*.so left by
    `python build_ext.py` next to a newer .abi3.so: Python would import the stale one first)."""
    folder, base = os.path.split(dest)
    stem = base.split(".", 1)[0]
    for f in os.listdir(folder):
        if f != base and f.split(".", 1)[0] == stem and f.endswith((".so", ".pyd")):
            try:
                os.remove(os.path.join(folder, f))
            except OSError:
                pass


def cmdclass():
    """setup() cmdclass: a build_ext that, after a normal (not --inplace) build, also copies the
    built modules into the source tree's tinyzq/ when that is writable and is the tree being
    built (pip builds in the tree since pip 21.3). Then `pip install .` followed by running the
    tests from the repository root works, although the repository's tinyzq/ shadows the
    installed package there. Disable with TINYZQ_NO_INPLACE=1."""
    import shutil

    from setuptools.command.build_ext import build_ext as _build_ext

    class build_ext(_build_ext):
        def run(self):
            super().run()
            if self.inplace:
                for ext in self.extensions:
                    if os.path.exists(self.get_ext_fullpath(ext.name)):
                        _remove_stale(self.get_ext_fullpath(ext.name))
                return
            if os.environ.get("TINYZQ_NO_INPLACE"):
                return
            pkg = os.path.join(HERE, "tinyzq")
            if not (os.path.isdir(pkg) and os.access(pkg, os.W_OK)):
                return
            for ext in self.extensions:
                built = self.get_ext_fullpath(ext.name)
                dest = os.path.join(HERE, *ext.name.split(".")[:-1], os.path.basename(built))
                if os.path.exists(built) and os.path.abspath(built) != os.path.abspath(dest):
                    try:
                        shutil.copyfile(built, dest + ".tmp")
                        os.replace(dest + ".tmp", dest)
                        _remove_stale(dest)
                    except OSError:
                        pass

    return {"build_ext": build_ext}


def build_inplace(verbose=False):
    """Compile every module for this machine into tinyzq/ next to the sources."""
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        tmp = os.path.join("build", "cffi-inplace")
        for name, _, _ in _variants():
            path = globals()["ffi_" + name].compile(tmpdir=tmp, verbose=verbose)
            dest = os.path.join("tinyzq", os.path.basename(path))
            os.replace(path, dest)
            _remove_stale(dest)
            print("built", dest)
    finally:
        os.chdir(cwd)


if __name__ == "__main__":
    build_inplace(verbose="-v" in sys.argv)
