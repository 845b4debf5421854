"""Write batches into an EmbeddingStore forever, announcing each one, until killed.

``python tests/scripts/store_writer.py PATH FINGERPRINT DIM BATCH [--max-cached-bytes N]``
prints ``begin N`` before batch ``N``'s transaction and ``commit N`` after it; the vector of
row ``i`` in batch ``N`` is :func:`expected_vector` ``(N, i, DIM)``, so a reader can check
every committed row exactly. With ``--max-cached-bytes`` the rows are cached
(``pinned=False``) under that cap, so every batch after the first evicts in its own
transaction. Used by tests/fmm/test_store.py to kill -9 a writer in the middle of a batch.
"""

import argparse

import torch


def expected_key(batch: int, i: int) -> str:
    return f"b{batch}-{i}"


def expected_vector(batch: int, i: int, dim: int) -> torch.Tensor:
    return torch.arange(dim, dtype=torch.float32) * 0.5 + batch * 1000.0 + i


def main(
    path: str, fingerprint: str, dim: int, batch_size: int, max_cached_bytes: int | None
) -> None:
    from train.store import EmbeddingStore

    store = EmbeddingStore(
        path, fingerprint, dim=dim, lru_size=0, max_cached_bytes=max_cached_bytes
    )
    batch = 0
    while True:
        items = {expected_key(batch, i): expected_vector(batch, i, dim) for i in range(batch_size)}
        print(f"begin {batch}", flush=True)
        store.put_many(items, pinned=max_cached_bytes is None)
        print(f"commit {batch}", flush=True)
        batch += 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("fingerprint")
    parser.add_argument("dim", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--max-cached-bytes", type=int, default=None)
    args = parser.parse_args()
    main(args.path, args.fingerprint, args.dim, args.batch_size, args.max_cached_bytes)
