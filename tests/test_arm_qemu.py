"""The aarch64 kernels (csrc/qgemm_arm.c, and csrc/attn_prefill.c's NEON code), cross-compiled and
run under qemu-aarch64.

tests/arm/gen_cases.py writes golden cases from the NumPy reference into a temporary file;
tests/arm/harness.c (the C API, with csrc/ compiled in as build_ext.py's unity source; no Python
on the ARM side) is built statically with aarch64-linux-gnu-gcc three times, with build_ext.py's
flags for the aarch64 modules: ref, neon (-march=armv8-a, must run on a Raspberry Pi 4) and dotprod
(-march=armv8.2-a+dotprod). Then:

- ref and neon pass under `-cpu cortex-a72` (no dotprod: an SDOT there is SIGILL) and `-cpu max`;
  dotprod passes under `-cpu max`; on cortex-a72 it refuses to run (feature detection), and
  forced, dies with SIGILL (so the A72 model really lacks dotprod and the neon pass means
  something);
- tzq_cpu_features() reports dotprod on `max` and not on `cortex-a72`;
- the neon build contains no dotprod/i8mm instruction at all;
- neon and dotprod give bit-identical products (same exact integer sums, same float code);
- causal grouped-query attention (tzq_attn_prefill) runs on every golden attention case in every
  variant, within tolerance of the float64 NumPy reference, and ref, neon and dotprod give
  bit-identical attention outputs (same multiply-then-add order in every variant);
- the sources compile without warnings (-Wall -Wextra -pedantic) for every aarch64 variant;
- a corrupted golden value makes the harness fail (it is not vacuous).

Skipped, with the reason, when the cross compiler or qemu is missing (.ci/run installs them).
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARM = os.path.join(ROOT, "tests", "arm")
CSRC = os.path.join(ROOT, "csrc")
GCC, QEMU, OBJDUMP = "aarch64-linux-gnu-gcc", "qemu-aarch64", "aarch64-linux-gnu-objdump"
_missing = [t for t in (GCC, QEMU) if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing) or not os.path.isdir(CSRC),
    reason=f"needs {' and '.join(_missing) or 'the source tree'} to cross-build and run the aarch64 "
           "kernels (apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; "
           ".ci/run installs them)")

RUNS = [("ref", "cortex-a72"), ("neon", "cortex-a72"), ("ref", "max"), ("neon", "max"), ("dotprod", "max")]
TIMEOUT = 600


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build_config():
    """(base flags, {variant: flags}, unity sources) of the aarch64 modules, from build_ext.py (one
    source of truth: -ffp-contract=off there is what makes the reference bit-exact with NumPy)."""
    be = _load(os.path.join(ROOT, "build_ext.py"), "_tzq_build_ext_for_arm_tests")
    variants = {}
    for name, macro, flags in be._VARIANTS["aarch64"]:
        variants[name] = list(flags) + (["-D" + macro] if macro else [])
    return list(be._BASE_FLAGS), variants, list(be.UNITY_SOURCES)


def _no_core():  # qemu dumps core for a guest SIGILL (the forced dotprod run): not in the tmp dir
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass


def _qemu(binary, cpu, cases, *args, cwd=None):
    return subprocess.run([QEMU, "-cpu", cpu, binary, cases, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, preexec_fn=_no_core)


def _summary(out):
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return last, dict(re.findall(r"(\w+)=(\S+)", last))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("arm")
    gen = _load(os.path.join(ARM, "gen_cases.py"), "_tzq_arm_gen_cases")
    cases = str(d / "cases.bin")
    gen.write_cases(cases, seed=0)
    quick = str(d / "quick.bin")
    offsets = gen.write_cases(quick, seed=1, quick=True)
    return {"dir": str(d), "cases": cases, "quick": quick, "offsets": offsets, "gen": gen}


@pytest.fixture(scope="module")
def binaries(work):
    base, variants, unity = _build_config()
    # the kernels as one translation unit, exactly like build_ext.py's modules (so that name
    # clashes between sources that only meet in an aarch64 build are caught here too)
    src = os.path.join(work["dir"], "tzq_unity.c")
    with open(src, "w") as f:
        # (a listed source that does not exist yet breaks every build anyway: not this test's job)
        f.write("".join('#include "%s"\n' % u for u in unity if os.path.exists(os.path.join(CSRC, u))))
    flags = base + ["-Wall", "-Wextra", "-pedantic", "-static", "-pthread", "-I" + CSRC]

    def build(name):
        out = os.path.join(work["dir"], "harness_" + name)
        cmd = [GCC] + flags + variants[name] + ["-o", out, os.path.join(ARM, "harness.c"), src, "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
        return name, out, r

    with ThreadPoolExecutor(2) as ex:
        built = list(ex.map(build, variants))
    for name, _, r in built:
        assert r.returncode == 0, f"cross build of the {name} harness failed:\n{r.stderr}"
    return {name: (out, r.stderr) for name, out, r in built}


@pytest.fixture(scope="module")
def runs(work, binaries):
    cache = {}

    def get(variant, cpu):
        if (variant, cpu) not in cache:
            cache[(variant, cpu)] = _qemu(binaries[variant][0], cpu, work["cases"], cwd=work["dir"])
        return cache[(variant, cpu)]

    return get


def test_sources_compile_without_warnings(binaries):
    assert set(binaries) == {"ref", "neon", "dotprod"}
    for name, (_, stderr) in binaries.items():
        assert stderr.strip() == "", f"{name}: warnings with -Wall -Wextra -pedantic:\n{stderr}"


@pytest.mark.skipif(shutil.which(OBJDUMP) is None, reason=f"needs {OBJDUMP}")
def test_neon_build_has_no_dotprod_instructions(binaries):
    def mnemonics(path):
        r = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                           timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        return re.findall(r"^\s*[0-9a-f]+:\s+(\w+)", r.stdout, re.M)

    bad = {"sdot", "udot", "usdot", "sudot", "smmla", "ummla", "usmmla"}
    neon = mnemonics(binaries["neon"][0])
    assert not bad & set(neon), sorted(bad & set(neon))
    assert "smull" in neon or "smull2" in neon  # the vmull_s8 path is there
    assert "sdot" in mnemonics(binaries["dotprod"][0])  # and the check can see an sdot


@pytest.mark.parametrize("variant, cpu", RUNS)
def test_harness_passes_under_qemu(work, runs, variant, cpu):
    r = runs(variant, cpu)
    last, s = _summary(r.stdout)
    assert r.returncode == 0, f"{variant} on {cpu}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    assert last.startswith("PASS") and s["failures"] == "0" and s["isa"] == variant, last
    assert int(s["products"]) > 800 and int(s["checks"]) > 5000, last
    assert s["rng_records"] == "3", last  # random directions: the same bits as x86 and NumPy
    # attention: every case, with 3 and 1 threads (bit-identical), within tolerance of float64
    assert int(s["attn_records"]) == len(work["gen"].ATTN_CASES) >= 4, last
    assert int(s["attn_runs"]) == 2 * int(s["attn_records"]), last
    assert float(s["attn_max_err_over_tol"]) <= 1.0, last
    if variant == "ref":  # the C reference is the NumPy reference, bit for bit
        assert s["exact_products"] == s["products"], last
    else:  # SIMD only reorders fp32 additions
        assert float(s["max_err_over_tol"]) <= 1.0, last
    first = dict(re.findall(r"(\w+)=(\S+)", r.stdout.splitlines()[0]))
    assert first["arch"] == "aarch64" and first["isa"] == variant
    feats = set(first["features"].split(","))
    assert "neon" in feats
    assert ("dotprod" in feats) == (cpu == "max"), first


def test_neon_and_dotprod_products_are_identical(runs):
    """Both compute exact integer block sums and then the same float operations."""
    a = _summary(runs("neon", "max").stdout)[1]
    b = _summary(runs("dotprod", "max").stdout)[1]
    c = _summary(runs("neon", "cortex-a72").stdout)[1]
    assert a["y_hash"] == b["y_hash"] == c["y_hash"]
    ref = _summary(runs("ref", "max").stdout)[1]
    assert ref["y_hash"] != a["y_hash"]  # the SIMD path really ran (different summation order)


def test_attention_outputs_are_identical_in_every_variant(runs):
    """attn_prefill's variants compute every dot product in the same order (plain multiply then add,
    -ffp-contract=off): the reference build, NEON and dotprod agree bit for bit, on either CPU."""
    hashes = {(variant, cpu): _summary(runs(variant, cpu).stdout)[1].get("attn_hash") for variant, cpu in RUNS}
    assert {"ref", "neon", "dotprod"} <= {variant for variant, _ in RUNS}
    assert None not in hashes.values() and len(set(hashes.values())) == 1, hashes


def test_dotprod_build_refused_on_cortex_a72(work, binaries):
    r = _qemu(binaries["dotprod"][0], "cortex-a72", work["quick"], cwd=work["dir"])
    assert r.returncode == 3, r.stdout + r.stderr
    assert "refused" in r.stdout and "dotprod" in r.stdout.splitlines()[-1]
    assert "features=neon " in r.stdout.splitlines()[0]
    # forced anyway: the emulated A72 has no SDOT, so the instruction traps
    r = _qemu(binaries["dotprod"][0], "cortex-a72", work["quick"], "--force", cwd=work["dir"])
    assert r.returncode != 0 and "PASS" not in r.stdout
    assert r.returncode == -4 or "Illegal instruction" in r.stderr, (r.returncode, r.stderr[-500:])


@pytest.mark.parametrize("variant", ["ref", "neon"])
@pytest.mark.parametrize("what, expect", [("W", "FAIL dequantize"), ("codes", "FAIL unpack"),
                                          ("xi2", "FAIL quantize_activations xi"), ("y3", "FAIL qmatmul"),
                                          ("z", "FAIL rng_fill bits"), ("mult", "FAIL rng_axpy bits"),
                                          ("attn_out", "FAIL attn_prefill within tolerance")])
def test_corrupted_golden_fails(work, binaries, tmp_path, variant, what, expect):
    """Flip one byte of one golden array: the harness must notice."""
    if ("quick", variant) not in work:  # the intact file passes
        work["quick", variant] = _qemu(binaries[variant][0], "max", work["quick"], cwd=work["dir"])
    ok = work["quick", variant]
    assert ok.returncode == 0 and _summary(ok.stdout)[0].startswith("PASS"), ok.stdout[-2000:]
    data = bytearray(open(work["quick"], "rb").read())
    rec = next(r for r in work["offsets"][1:] if what in r)  # the second weight record, or the first rng/attention one
    fp32 = what in ("W", "y3", "z", "mult", "attn_out")
    off = rec[what] + (3 if fp32 else 0)  # fp32: the byte with sign and exponent
    data[off] ^= 0x40 if fp32 else 0x01
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(data))
    r = _qemu(binaries[variant][0], "max", str(bad), cwd=work["dir"])
    assert r.returncode == 1, r.stdout[-2000:]
    assert expect in r.stdout and _summary(r.stdout)[0].startswith("FAIL"), r.stdout[-2000:]
