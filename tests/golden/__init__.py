"""The golden image set (tests/test_golden.py): render.py renders it."""
