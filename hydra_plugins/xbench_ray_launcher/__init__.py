"""`xbench sweep NAME --launcher ray`: the grid's points on a Ray cluster (see ray_launcher.py)."""
