"""Engines: one network each, behind the interface in `base.py` (lifecycle, input validation, errors);
one module per backend (`onnxruntime.py`, `openvino.py`, `tensorrt.py`, `ort_tensorrt.py`; TensorRT's
profiles and plan keys, which need no TensorRT, are in `trt_plans.py`), and the registry that finds
and opens them (`registry.py`). The registry's public names are re-exported here:
`from runtime.engines import open_engines`."""

from runtime.engines.registry import (ALL_NETWORKS, BACKENDS, ENTRY_POINT_GROUP, BackendError, Engine,
                                      EngineInfo, EngineLoadError, available_backends, backend_module,
                                      choose_backend, close_all, network_options, open_engines, open_engines_why,
                                      open_network)

__all__ = ["ALL_NETWORKS", "BACKENDS", "ENTRY_POINT_GROUP", "BackendError", "Engine", "EngineInfo", "EngineLoadError",
           "available_backends", "backend_module", "choose_backend", "close_all", "network_options", "open_engines",
           "open_engines_why", "open_network"]
