"""Reading one unit's column and one 1,000-sample block of a large score store: mmap against zarr.

Builds a synthetic store of 20,000 samples x 50,000 units (float16 per-sample act, freq and grad,
the probe's chunking of 256 samples x 8,192 units) twice, with the probe's two per-sample codecs:
"none" (raw, unit-major chunks + crc32c) and "zstd" (Blosc/Zstd + crc32c, the default). Then reads
`per_sample/act[:, UNIT]` and `per_sample/act[START:START + 1000, :]` three ways:

    mmap        ScoreStore.open(raw, mmap=True)   memory maps of the chunk files
    zarr-raw    ScoreStore.open(raw)               plain zarr, uncompressed chunks
    zarr-zstd   ScoreStore.open(zstd)              plain zarr, compressed chunks

Each measurement runs in a fresh process (so peak RSS is the read's own), after the store's files
are evicted from the page cache with posix_fadvise(DONTNEED) (checked with mincore), then repeats
the read in the same process (warm). Writes bench/results/store_read.json and removes the stores.

    python bench/store_read.py                  # about 10 minutes on 2 cores; ~11 GB of disk for a while
    python bench/store_read.py --samples 2000 --units 20000 --repeats 1 --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"mmap": ("raw.zarr", True), "zarr-raw": ("raw.zarr", False), "zarr-zstd": ("zstd.zarr", False)}
READS = ("column", "block")
STATS = ("act", "freq", "grad")
CHUNK_SAMPLES, UNIT_CHUNK, BLOCK = 256, 8192, 1000


def _store_module():
    """tinyonn.store.zarr_store without the package's __init__ (which imports torch and the model
    code): the RSS measured is the store's and numpy/zarr's, not a deep-learning stack's."""
    if "tinyonn" not in sys.modules:
        package = types.ModuleType("tinyonn")
        package.__path__ = [str(ROOT / "tinyonn")]
        sys.modules["tinyonn"] = package
    import tinyonn.store.zarr_store as zarr_store

    return zarr_store


# --------------------------------------------------------------------------------------------
# Building the stores


def build(directory: Path, n: int, u: int, seed: int = 0) -> dict:
    """Both stores, written block by block from one seeded generator (same values in each)."""
    import zarr

    zs = _store_module()
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    groups = {}
    for name, codec in (("raw.zarr", "none"), ("zstd.zarr", "zstd")):
        group = zarr.open_group(directory / name, mode="w")
        group.update_attributes({"schema_version": zs.SCHEMA_VERSION, "n_samples": n, "n_units": u, "n_heads": 0,
                                 "chunk_samples": CHUNK_SAMPLES, "unit_chunk": UNIT_CHUNK, "per_sample": True,
                                 "per_sample_codec": codec, "categories": ["synthetic"], "finalized": False,
                                 "fingerprint": "bench/store_read.py synthetic"})
        for stat in STATS:
            zs._empty(group, f"per_sample/{stat}", (n, u), (CHUNK_SAMPLES, UNIT_CHUNK), np.float16,
                      dims=("sample", "unit"), codec=codec)
        groups[name] = group
    rng = np.random.default_rng(seed)
    scale = rng.lognormal(-4.0, 0.7, u).astype(np.float32)     # per-unit activation scale
    rate = rng.beta(0.6, 2.5, u).astype(np.float32)            # per-unit firing rate
    for start in range(0, n, CHUNK_SAMPLES):
        rows = min(CHUNK_SAMPLES, n - start)
        tokens = rng.integers(8, 300, rows).astype(np.float32)[:, None]
        act = (rng.standard_gamma(0.8, (rows, u), dtype=np.float32) * scale).astype(np.float16)
        noise = rng.standard_normal((rows, u), dtype=np.float32)
        freq = (np.clip(np.round(rate * tokens + noise * np.sqrt(rate * (1 - rate) * tokens)), 0, tokens)
                / tokens).astype(np.float16)
        grad = (np.exp(0.5 * rng.standard_normal((rows, u), dtype=np.float32)) * scale * 4).astype(np.float16)
        for group in groups.values():
            for stat, values in (("act", act), ("freq", freq), ("grad", grad)):
                group[f"per_sample/{stat}"][start:start + rows] = values
        print(f"\rbuild: {start + rows:,}/{n:,} samples", end="", flush=True)
    print()
    for name in groups:
        _fsync_tree(directory / name)
    return {"seconds": round(time.perf_counter() - started, 1),
            "bytes": {name: _tree_bytes(directory / name / "per_sample" / "act") for name in groups},
            "bytes_all_stats": {name: _tree_bytes(directory / name / "per_sample") for name in groups}}


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


def _fsync_tree(path: Path) -> None:
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Page cache


def evict(path: Path) -> None:
    """Drop `path`'s files from this machine's page cache (they are clean: written and fsynced)."""
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(path: Path) -> float:
    """Fraction of `path`'s file pages in the page cache (mincore over a read-only map of each file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    resident = total = 0
    for p in _files(path):
        size = p.stat().st_size
        if not size:
            continue
        with open(p, "rb") as f:
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        pages = -(-size // mmap.PAGESIZE)
        vector = ctypes.create_string_buffer(pages)
        view = np.frombuffer(mapped, dtype=np.uint8)  # only for its address: nothing is read
        failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector)
        del view
        mapped.close()
        if failed:
            raise OSError(ctypes.get_errno(), "mincore failed")
        resident += int(np.count_nonzero(np.frombuffer(vector.raw, dtype=np.uint8) & 1))
        total += pages
    return resident / max(1, total)


# --------------------------------------------------------------------------------------------
# One measurement (a fresh process)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, read: str, directory: Path, unit: int, start: int) -> dict:
    zs = _store_module()
    name, use_mmap = VARIANTS[variant]
    store = zs.ScoreStore.open(directory / name, mmap=use_mmap)
    array = store.array("per_sample/act")
    key = np.s_[:, unit] if read == "column" else np.s_[start:start + BLOCK, :]
    rss_before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    t0 = time.perf_counter()
    values = np.asarray(array[key])
    cold = time.perf_counter() - t0
    peak = _status_kb("VmHWM")  # not ru_maxrss: Linux carries the parent's over fork and exec
    digest = hashlib.sha256(values.tobytes()).hexdigest()[:16]
    shape = list(values.shape)
    del values
    t0 = time.perf_counter()
    again = np.asarray(array[key])
    warm = time.perf_counter() - t0
    assert hashlib.sha256(again.tobytes()).hexdigest()[:16] == digest
    return {"cold_s": cold, "warm_s": warm, "rss_before_mib": rss_before / 1024, "hwm_before_mib": hwm_before / 1024,
            "peak_rss_mib": peak / 1024, "peak_over_start_mib": (peak - rss_before) / 1024,
            "mapped_type": type(array).__name__, "shape": shape, "sha256_16": digest}


def measure(variant: str, read: str, directory: Path, unit: int, start: int) -> dict:
    path = directory / VARIANTS[variant][0]
    evict(path)
    before = resident_fraction(path / "per_sample" / "act")
    command = [sys.executable, __file__, "--child", variant, read, "--dir", str(directory),
               "--unit", str(unit), "--start", str(start)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["resident_before_read"] = round(before, 5)
    return result


# --------------------------------------------------------------------------------------------


def _device() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"cpu ({model}, {os.cpu_count()} cores, {memory:.0f} GiB RAM), local ext4 on a virtual disk"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--units", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/tinyonn-store-read")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "store_read.json"))
    parser.add_argument("--keep", action="store_true", help="keep the stores (and reuse them next time)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "READ"), help=argparse.SUPPRESS)
    parser.add_argument("--unit", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    if args.child:
        print(json.dumps(child(*args.child, directory, args.unit, args.start)))
        return 0

    import zarr

    unit = min(args.units - 1, int(args.units * 0.62674))       # mid-chunk, not on a boundary (31,337 of 50,000)
    start = min(args.samples - BLOCK, int(args.samples * 0.25))  # 5,000: not on a chunk boundary either
    load_at_start = os.getloadavg()
    reused = (directory / "zstd.zarr" / "per_sample" / "act" / "zarr.json").is_file() and args.keep
    try:
        if reused:
            built = {"seconds": None, "bytes": {n: _tree_bytes(directory / n / "per_sample" / "act")
                                                for n in ("raw.zarr", "zstd.zarr")}}
        else:
            shutil.rmtree(directory, ignore_errors=True)
            built = build(directory, args.samples, args.units)
        runs: dict[str, dict[str, list[dict]]] = {v: {r: [] for r in READS} for v in VARIANTS}
        for repeat in range(args.repeats):
            for read in READS:
                for variant in VARIANTS:
                    result = measure(variant, read, directory, unit, start)
                    runs[variant][read].append(result)
                    print(f"[{repeat + 1}/{args.repeats}] {read:<6} {variant:<9} cold {result['cold_s'] * 1e3:9.1f} ms  "
                          f"warm {result['warm_s'] * 1e3:8.1f} ms  peak RSS {result['peak_rss_mib']:7.1f} MiB "
                          f"(+{result['peak_over_start_mib']:.1f})  resident before {result['resident_before_read']:.3f}",
                          flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    digests = {read: {variant: {r["sha256_16"] for r in runs[variant][read]} for variant in VARIANTS} for read in READS}
    identical = all(len(set.union(*d.values())) == 1 for d in digests.values())
    array_mib = args.samples * args.units * 2 / 2**20
    median = {variant: {read: {key: statistics.median(r[key] for r in runs[variant][read])
                               for key in ("cold_s", "warm_s", "peak_rss_mib", "peak_over_start_mib")}
                        for read in READS} for variant in VARIANTS}
    speedup = {read: {"zarr-zstd / mmap (cold)": median["zarr-zstd"][read]["cold_s"] / median["mmap"][read]["cold_s"],
                      "zarr-raw / mmap (cold)": median["zarr-raw"][read]["cold_s"] / median["mmap"][read]["cold_s"],
                      "zarr-zstd / mmap (warm)": median["zarr-zstd"][read]["warm_s"] / median["mmap"][read]["warm_s"]}
               for read in READS}
    result = {
        "device": _device(),
        "load_average_1_5_15min": {"start": [round(v, 2) for v in load_at_start],
                                   "end": [round(v, 2) for v in os.getloadavg()],
                                   "note": "the 2 cores are shared with other users' jobs"},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/store_read.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "zarr": zarr.__version__},
        "store": {"samples": args.samples, "units": args.units, "stats": list(STATS), "dtype": "float16",
                  "chunks": [CHUNK_SAMPLES, UNIT_CHUNK], "array": "per_sample/act", "array_mib": array_mib,
                  "bytes_on_disk_act": built["bytes"], "bytes_on_disk_all_stats": built.get("bytes_all_stats"),
                  "build_seconds": built["seconds"]},
        "reads": {"column": f"per_sample/act[:, {unit}]", "block": f"per_sample/act[{start}:{start + BLOCK}, :]"},
        "method": ("each read in a fresh process (peak RSS = VmHWM after the read; 'over start' subtracts the "
                   "process's RSS just before it: interpreter, numpy, zarr, the opened store); before each, "
                   "the store's files are evicted from this VM's page cache with posix_fadvise(DONTNEED) and "
                   "mincore confirms it ('resident_before_read'); 'warm' repeats the read in the same process. "
                   "Not dropped: the hypervisor's cache under the virtual disk (cold reads may come from the "
                   "host's memory) and the shared libraries' pages."),
        "identical_results": identical,
        "median": median,
        "speedup": speedup,
        "targets": {"column: mmap cold >= 5x faster than zarr-zstd": speedup["column"]["zarr-zstd / mmap (cold)"] >= 5,
                    "mmap peak RSS over start < 10% of the array, column": median["mmap"]["column"]["peak_over_start_mib"] < 0.1 * array_mib,
                    "mmap peak RSS over start < 10% of the array, block": median["mmap"]["block"]["peak_over_start_mib"] < 0.1 * array_mib,
                    "mmap absolute peak RSS < 10% of the array, column": median["mmap"]["column"]["peak_rss_mib"] < 0.1 * array_mib,
                    "mmap absolute peak RSS < 10% of the array, block": median["mmap"]["block"]["peak_rss_mib"] < 0.1 * array_mib},
        "raw": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("median", "speedup", "targets", "identical_results")}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
