"""The engine folder: its manifest (manifest.py), path containment (paths.py), the network
contracts every graph follows (networks.py) and the ONNX external-data checks (onnx_refs.py)."""
