"""Moving tensor bytes: the writer (chunk, hash, dedup, encode, store), the read plan and the reader."""
