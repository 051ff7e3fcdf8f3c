"""Measuring: one load generator (load.py), one statistics module (stats.py), runners."""
