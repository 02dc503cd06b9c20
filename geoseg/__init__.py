"""geoseg: NAIP + USGS 3DEP LiDAR land-cover datasets, models, retrieval and a QGIS plugin."""

__version__ = "0.1.0"
