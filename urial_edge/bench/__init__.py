"""Measurements behind ``urial-edge bench``; they write JSON. Reports and charts are drawn under ``benchmarks/``."""
