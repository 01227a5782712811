"""Cross-cutting service pieces: configuration."""
