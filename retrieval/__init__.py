"""Tile retrieval (text -> tile, tile -> tile): see docs/retrieval.md."""
