"""Lossless compression of bf16 expert weights (exponent coding)."""

from wisp_jax.compress.codec import (Compressed, compressed_bytes, decode,
                                     encode, exponent_entropy, raw_bytes)

__all__ = ["Compressed", "compressed_bytes", "decode", "encode",
           "exponent_entropy", "raw_bytes"]
