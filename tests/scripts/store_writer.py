"""Write batches into an EmbeddingStore forever, announcing each one, until killed.

``python tests/scripts/store_writer.py PATH FINGERPRINT DIM BATCH`` prints ``begin N`` before
batch ``N``'s transaction and ``commit N`` after it; the vector of row ``i`` in batch ``N`` is
:func:`expected_vector` ``(N, i, DIM)``, so a reader can check every committed row exactly.
Used by tests/fmm/test_store.py to kill -9 a writer in the middle of a batch.
"""

import sys

import torch


def expected_key(batch: int, i: int) -> str:
    return f"b{batch}-{i}"


def expected_vector(batch: int, i: int, dim: int) -> torch.Tensor:
    return torch.arange(dim, dtype=torch.float32) * 0.5 + batch * 1000.0 + i


def main(path: str, fingerprint: str, dim: int, batch_size: int) -> None:
    from fmm.store import EmbeddingStore

    store = EmbeddingStore(path, fingerprint, dim=dim, lru_size=0)
    batch = 0
    while True:
        items = {expected_key(batch, i): expected_vector(batch, i, dim) for i in range(batch_size)}
        print(f"begin {batch}", flush=True)
        store.put_many(items)
        print(f"commit {batch}", flush=True)
        batch += 1


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
