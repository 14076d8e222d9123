"""Calibration data and the precision study (INT8 vision, importance matrices, bench, eval)."""
