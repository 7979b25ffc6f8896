"""The score store: a Zarr v3 group of per-sample and per-unit statistics, and the scores built on it.

- `zarr_store`: `ScoreStore` (lazy, read-only), its chunkwise writer and the resume bookkeeping.
- `integrity`: which chunks a store must hold; `StoreDamagedError` for a missing, truncated or
  corrupted chunk (named by array and chunk key), `ScoreStoreError` for everything else.
- `mapped`: `MappedArray`, memory-mapped reads of uncompressed arrays (`ScoreStore.open(path, mmap=True)`).
- `scores`: PIDiff and the baseline scores (Wanda-like, Taylor, random) from a store's summaries.
"""

from tinyonn.store.integrity import ScoreStoreError, StoreDamagedError
from tinyonn.store.mapped import MappedArray
from tinyonn.store.zarr_store import ScoreStore
from tinyonn.store.scores import ScoreConfig, score_store

__all__ = ["MappedArray", "ScoreConfig", "ScoreStore", "ScoreStoreError", "StoreDamagedError", "score_store"]
