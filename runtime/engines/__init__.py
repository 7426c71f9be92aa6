"""Engines: one network each, behind the interface in `base.py`."""
