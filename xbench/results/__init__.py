"""Result files (store.py), tables (report.py) and charts (plot.py)."""
