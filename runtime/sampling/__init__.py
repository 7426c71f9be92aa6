"""Sampling: the step functions (samplers.py), noise schedules and timestep grids (schedules.py),
DeepCache's call plan (deepcache.py), A1111's sampler names (names.py) and its variation seeds
(variation.py: subseed slerp, seed resizing). The registry, one
record per sampler, is runtime/scheduler.py, the front door."""
