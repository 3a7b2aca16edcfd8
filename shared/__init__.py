"""The contract between Tandem's tiers: bundle format, signing, tensor codec, protocol, errors.

This package depends on nothing else in Tandem; ``quantize``, ``cloud`` and ``edge`` depend on it
and never on each other.
"""

__version__ = "0.1.0"
