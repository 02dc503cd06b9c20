"""Find NAIP imagery and 3DEP LiDAR through STAC: Planetary Computer, any API, or the sample."""
