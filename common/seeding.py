"""Every seed in a run derives from the one run seed, never from the clock.

`derive_seed(run_seed, "map", layer, chunk)` hashes its parts, so the same parts give the same seed
on every machine and process (Python's `hash` is salted per process, so it is not used).
"""

import hashlib


def derive_seed(run_seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on `run_seed` and `parts` (their `repr`)."""
    text = repr((int(run_seed),) + tuple(parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
