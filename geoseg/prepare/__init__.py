"""Benchmark releases (ISPRS Vaihingen, DFC2018) turned into geoseg builds.

`geoseg prepare <dataset> --src RELEASE --out BUILD` writes the folder `geoseg build-dataset`
writes (tiles, index.parquet, splits.json, stats.json, a STAC collection) with the benchmark's
own class set and protocol, so `geoseg train / evaluate / predict` work on it unchanged.
One module per dataset; `run` writes a checked plan, `tiles` and `catalog` the files.
"""
