"""Per-row randomness that depends only on the run's seed and the row, never on scheduling."""

from __future__ import annotations

import hashlib
import random


def row_seed(seed: int, row_id: str, *salt: object) -> int:
    """A 31-bit seed from the run seed, the row id and a salt (stage name, attempt, ...)."""
    key = ":".join(map(str, (seed, row_id, *salt))).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big") >> 1


def row_rng(seed: int, row_id: str, *salt: object) -> random.Random:
    return random.Random(row_seed(seed, row_id, *salt))
