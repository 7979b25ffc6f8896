"""Clustering 350,208 units (the Qwen3-4B shape: 36 layers × 9,728 FFN units): time and peak memory.

Builds a synthetic score store of that shape with the probe's own writer, layout and codecs
(`ScoreStoreWriter`: per-sample act/freq/grad/taylor float16 in Blosc/Zstd chunks of 256 samples ×
8,192 units, per-category partial sums, then `finalize` with the PIDiff score), then runs each
partition in a fresh process (`tinyonn.clustering.cluster`, the real code) and records its wall
time, the time of each step (the plan's `info["timings"]`) and the process's peak RSS while it
clusters (VmHWM, reset after the imports and the store's opening; and that peak minus the RSS
then, the clustering's own). Writes
bench/results/cluster_scale.json.

The statistics are realistic in their structure, not copied from a teacher: every sample has a
category and a 12-dimensional latent (its category's mean plus noise); every unit belongs to one
of 150 latent "concepts" of its layer (a loading vector near the concept's centre) and has its own
scale, so log activations are low-rank plus noise across samples (what co-activation k-means and
the co-activation embedding look for); frequency, gradient norm and the Taylor term follow the
activation with their own unit-level spread; a few units per layer fire on almost every token
(the shared-expert candidates).

    python bench/cluster_scale.py                                   # ~1-2 h on 2 shared cores
    python bench/cluster_scale.py --layers 4 --units 2048 --out /tmp/c.json     # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CATEGORIES = ("chat", "code", "math", "reasoning", "science", "translation", "writing", "knowledge")
LATENT, CONCEPTS = 12, 150
HEADS_PER_LAYER = 32


def _status_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: this process image's peak) in GiB.
    (Not getrusage's ru_maxrss: Linux carries it over from the parent across fork and exec, so a
    child started by a large parent would report the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _maxrss_gib() -> float:
    return _status_gib("VmHWM")


def _rss_gib() -> float:
    return _status_gib("VmRSS")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------
# The synthetic store


class Synthetic:
    """Seeded generator of the per-sample statistics of every unit, a block of samples at a time."""

    def __init__(self, layers: int, units: int, samples: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.layers, self.units, self.samples = layers, units, samples
        n_units = layers * units
        self.sample_category = rng.integers(0, len(CATEGORIES), samples).astype(np.int16)
        means = rng.normal(0, 1, (len(CATEGORIES), LATENT))
        self.z = (means[self.sample_category] + 0.7 * rng.normal(0, 1, (samples, LATENT))).astype(np.float32)
        concept = rng.integers(0, CONCEPTS, n_units)
        layer = np.repeat(np.arange(layers), units)
        centres = rng.normal(0, 1, (layers, CONCEPTS, LATENT))
        self.loading = (centres[layer, concept] + 0.35 * rng.normal(0, 1, (n_units, LATENT))).astype(np.float32)
        self.loading /= np.float32(np.sqrt(LATENT))
        self.base = rng.normal(-3.5, 0.6, n_units).astype(np.float32)  # log mean |h| (~0.03)
        self.fire = rng.normal(-1.0, 1.0, n_units).astype(np.float32)
        self.fire[rng.random(n_units) < 0.02] += 6.0  # broad units: fire on almost every token
        self.grad_base = rng.normal(-6.0, 0.8, n_units).astype(np.float32)
        self.down_norm = rng.lognormal(0.0, 0.25, n_units).astype(np.float32)
        self.seed = seed

    def block(self, start: int, stop: int):
        """ChunkStats of samples [start, stop)."""
        from tinyonn.store.zarr_store import ChunkStats

        rng = np.random.default_rng([self.seed, start])
        n, u = stop - start, self.layers * self.units
        log_act = self.z[start:stop] @ self.loading.T  # [n, U]
        log_act *= 0.8
        log_act += self.base
        log_act += 0.25 * rng.standard_normal((n, u), dtype=np.float32)
        centred = log_act - self.base
        freq = 1.0 / (1.0 + np.exp(-(2.0 * centred + self.fire)))
        grad = np.exp(self.grad_base + 0.5 * centred + 0.3 * rng.standard_normal((n, u), dtype=np.float32))
        act = np.exp(log_act)
        del log_act, centred
        taylor = act * grad * np.exp(0.3 * rng.standard_normal((n, u), dtype=np.float32)) * 5.0
        heads = self.layers * HEADS_PER_LAYER
        head_out = rng.lognormal(0.0, 0.3, (n, heads)).astype(np.float32)
        head_grad = rng.lognormal(-5.0, 0.5, (n, heads)).astype(np.float32)
        return ChunkStats(act=act, freq=freq.astype(np.float32), grad=grad, taylor=taylor, head_out=head_out,
                          head_grad=head_grad, loss=rng.lognormal(0.7, 0.3, n).astype(np.float32),
                          n_tokens=rng.integers(64, 512, n).astype(np.int32))


def build_store(path: Path, layers: int, units: int, samples: int, chunk_samples: int) -> dict:
    """Write the synthetic store at `path` (replacing one there); returns its description."""
    from tinyonn.store.scores import PIDIFF_FORMULA, ScoreConfig, summary_score_fn
    from tinyonn.store.zarr_store import ScoreStoreWriter

    if path.exists():
        shutil.rmtree(path)
    started = time.perf_counter()
    synthetic = Synthetic(layers, units, samples)
    n_heads = layers * HEADS_PER_LAYER
    writer = ScoreStoreWriter.open(
        path, units_layer=np.repeat(np.arange(layers), units).astype(np.int16),
        units_index=np.tile(np.arange(units), layers).astype(np.int32),
        heads_layer=np.repeat(np.arange(layers), HEADS_PER_LAYER).astype(np.int16),
        heads_index=np.tile(np.arange(HEADS_PER_LAYER), layers).astype(np.int16),
        categories=list(CATEGORIES), sample_category=synthetic.sample_category,
        source_index=np.arange(samples, dtype=np.int64), chunk_samples=chunk_samples, per_sample=True,
        attrs={"fingerprint": f"bench/cluster_scale.py synthetic {layers}x{units}x{samples}",
               "teacher": f"synthetic ({layers} layers x {units} units)", "formula": PIDIFF_FORMULA},
        units_down_norm=synthetic.down_norm)
    for k in writer.pending_chunks():
        start, stop = writer.chunk_range(k)
        writer.write_chunk(k, synthetic.block(start, stop))
        print(f"  store chunk {k + 1}/{writer.n_chunks} written ({time.perf_counter() - started:.0f} s)", flush=True)
    writer.finalize(summary_score_fn(ScoreConfig()), score_attrs={"score": "pidiff"})
    per_array = {}
    for group in ("per_sample", "partials", "summary", "samples", "units", "heads"):
        for array in sorted((path / group).iterdir()) if (path / group).is_dir() else []:
            if array.is_dir() and (array / "zarr.json").is_file():
                per_array[f"{group}/{array.name}"] = _dir_bytes(array)
    return {"layers": layers, "units_per_layer": units, "units": layers * units, "heads": n_heads,
            "samples": samples, "categories": len(CATEGORIES), "chunk_samples": chunk_samples,
            "build_s": round(time.perf_counter() - started, 1), "bytes": _dir_bytes(path),
            "bytes_per_array": per_array, "build_peak_rss_gib": round(_maxrss_gib(), 2)}


# --------------------------------------------------------------------------------------------
# One method, in its own process


def run_method(store_path: Path, method: str) -> dict:
    """Cluster the store with `method` (default settings otherwise); time, memory, the plan's shape."""
    import tinyonn  # noqa: F401  (the same imports as a real run, before the baseline RSS)
    from tinyonn.clustering import ClusterConfig, cluster
    from tinyonn.store import ScoreStore

    store = ScoreStore.open(store_path)
    baseline = _rss_gib()
    _reset_peak()  # the import transients are not the clustering's
    started = time.perf_counter()
    plan = cluster(store, ClusterConfig(method=method))
    seconds = time.perf_counter() - started
    peak = _maxrss_gib()
    experts = [lp.num_experts for lp in plan.layers]
    return {"method": method, "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2),
            "rss_before_gib": round(baseline, 2), "peak_over_start_gib": round(peak - baseline, 2),
            "timings": plan.info.get("timings"), "experts_total": int(sum(experts)),
            "experts_per_layer": [min(experts), max(experts)],
            "shared_per_layer": [min(len(lp.shared_units) for lp in plan.layers),
                                 max(len(lp.shared_units) for lp in plan.layers)],
            "method_info": {k: plan.info[k] for k in ("kmeans", "hdbscan", "coactivation") if k in plan.info}}


def _measure(store_path: Path, method: str, timeout_s: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--store", str(store_path)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"[{method}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"method": method, "fits": False, "seconds": None,
                "why": f"did not finish within {timeout_s:.0f} s on this machine"}
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        killed = done.returncode in (-9, 137)
        return {"method": method, "fits": False, "seconds": round(time.perf_counter() - started, 1),
                "why": ("killed (out of memory?)" if killed else f"exit {done.returncode}") + ": " + " | ".join(tail)}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["fits"] = True
    print(f"[{method}] {result['seconds']} s, peak RSS {result['peak_rss_gib']} GiB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--units", type=int, default=9728, help="FFN units per layer")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--chunk-samples", type=int, default=256)
    parser.add_argument("--methods", nargs="+", default=["coact-kmeans", "pidiff-hdbscan"])
    parser.add_argument("--store", default=None, help="where the synthetic store goes (default: a folder under "
                        "stores/runs/, removed at the end unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic store")
    parser.add_argument("--reuse", action="store_true", help="use the store at --store as it is")
    parser.add_argument("--timeout-s", type=float, default=4 * 3600, help="per method")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster_scale.json"))
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child: run one method, print JSON
    args = parser.parse_args()

    if args.method is not None:
        print(json.dumps(run_method(Path(args.store), args.method)))
        return

    store_path = Path(args.store or ROOT / "stores" / "runs" / "_cluster_scale" / "scores.zarr")
    load_before = os.getloadavg()
    if args.reuse:
        from tinyonn.store import ScoreStore

        opened = ScoreStore.open(store_path)
        store_info = {"units": opened.n_units, "samples": opened.n_samples, "bytes": _dir_bytes(store_path),
                      "reused": str(store_path)}
    else:
        print(f"building a {args.layers} x {args.units} unit, {args.samples}-sample store at {store_path}", flush=True)
        store_info = build_store(store_path, args.layers, args.units, args.samples, args.chunk_samples)
        print(f"store: {store_info['bytes'] / 2**30:.2f} GiB in {store_info['build_s']} s", flush=True)
    methods = {method: _measure(store_path, method, args.timeout_s) for method in args.methods}
    result = {
        "device": "cpu (2 cores)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in os.getloadavg()],
                    "note": "the 2 cores were shared with other jobs; OMP_NUM_THREADS="
                            + os.environ.get("OMP_NUM_THREADS", "1")},
        "store": store_info,
        "methods": methods,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({name: {k: m.get(k) for k in ("fits", "seconds", "peak_rss_gib", "why")}
                      for name, m in methods.items()}, indent=1))
    print(f"written {out}")
    if not args.keep and not args.reuse:
        shutil.rmtree(store_path.parent if store_path.parent.name == "_cluster_scale" else store_path)


if __name__ == "__main__":
    main()
