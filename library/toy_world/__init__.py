"""The toy world: captioned shape images, a classifier that reads them, a toy SD1-layout model (docs/quality.md)."""
