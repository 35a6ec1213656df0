"""The static play page of `reciprocity serve` (shipped as package data)."""
