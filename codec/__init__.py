"""NWC: neural weight compression — a learned, entropy-coded codec for neural-network weights."""

__version__ = "0.1.0"
