"""ONNX Runtime's GPU routes (runtime/engines/onnxruntime.py, ort_tensorrt.py) up to the point where
the providers are handed to ORT, on a machine without onnxruntime-gpu.

The boundary is mocked, and only it: `FakeOrt` stands in for the `onnxruntime` module (its
InferenceSession records what it was given, reports the real graph's inputs and outputs read with
onnx, and reports the providers a test says ORT ended up with; its OrtValue / IOBinding keep NumPy
arrays where ORT would keep device memory), and `ctypes.CDLL` for the loader. Nothing here runs on
a GPU; what ORT does with the providers is checked on a GPU machine (benchmarks/gpu.py)."""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest

import runtime
from runtime.engines import ort_tensorrt
from runtime.engines.onnxruntime import OrtEngine, ProviderFallbackError
from runtime.engines.ort_tensorrt import TensorRTLibrariesMissing, ort_tensorrt_provider_options, ort_tensorrt_providers
from runtime.errors import BackendError, EngineInputError
from runtime.folder.manifest import load_manifest
from runtime.folder.networks import network_io

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
_ONNX_TYPES = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
               onnx.TensorProto.INT32: "tensor(int32)"}


def _node_args(values) -> list:
    args = []
    for v in values:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        args.append(types.SimpleNamespace(name=v.name, type=_ONNX_TYPES[v.type.tensor_type.elem_type], shape=dims))
    return args


class FakeOrtValue:
    made: list["FakeOrtValue"] = []

    def __init__(self, array: np.ndarray, device: str):
        self.array, self.device = array.copy(), device
        FakeOrtValue.made.append(self)

    @classmethod
    def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
        return cls(array, f"{device_type}:{device_id}")

    def update_inplace(self, array):
        self.array[...] = array  # same buffer, new contents: what a CUDA graph needs


class FakeBinding:
    def __init__(self, session):
        self.session, self.inputs, self.outputs, self.bound_outputs = session, {}, {}, {}

    def bind_ortvalue_input(self, name, value): self.inputs[name] = value
    def bind_output(self, name, device_type, device_id): self.outputs[name] = f"{device_type}:{device_id}"
    def bind_ortvalue_output(self, name, value): self.bound_outputs[name] = value
    def get_outputs(self): return [self.session.last[name] for name in self.outputs]
    def copy_outputs_to_cpu(self): return [self.session.last[name].array.copy() for name in self.outputs]


class FakeSession:
    def __init__(self, ort, path, options, providers=None, provider_options=None):
        ort.events.append(("session", path))
        self.path, self.options, self.providers, self.provider_options = path, options, providers, provider_options
        model = onnx.load(path, load_external_data=False)
        self._inputs, self._outputs = _node_args(model.graph.input), _node_args(model.graph.output)
        self._taken = ort.taken(list(providers))
        self.runs = 0
        ort.sessions.append(self)

    def get_inputs(self): return self._inputs
    def get_outputs(self): return self._outputs
    def get_providers(self): return self._taken
    def io_binding(self): return FakeBinding(self)

    def run_with_iobinding(self, binding):
        """Outputs of the contract's shapes (symbolic axes from the inputs), filled with the run count."""
        self.runs += 1
        axes = {}
        for arg in self._inputs:
            axes.update({d: n for d, n in zip(arg.shape, binding.inputs[arg.name].array.shape) if isinstance(d, str)})
        self.last = {}
        for arg in self._outputs:
            shape = tuple(axes[d] if isinstance(d, str) else d for d in arg.shape)
            value = binding.bound_outputs.get(arg.name) or FakeOrtValue(np.zeros(shape, np.float32), "cuda:0")
            value.array[...] = self.runs
            self.last[arg.name] = value


class FakeOrt(types.ModuleType):
    """The `onnxruntime` module of an onnxruntime-gpu build with CUDA and TensorRT EPs."""

    def __init__(self, version: str = "1.23.0", taken=lambda requested: requested):
        super().__init__("onnxruntime")
        self.__version__, self.taken = version, taken
        self.events: list[tuple[str, str]] = []
        self.sessions: list[FakeSession] = []
        self.OrtValue = FakeOrtValue
        self.GraphOptimizationLevel = types.SimpleNamespace(ORT_DISABLE_ALL=0, ORT_ENABLE_BASIC=1,
                                                            ORT_ENABLE_EXTENDED=2, ORT_ENABLE_ALL=99)
        info = types.SimpleNamespace(cuda_version="12.2")  # capi/build_and_package_info.py of the 1.23.0 wheel
        self.capi = types.SimpleNamespace(build_and_package_info=info)

    def get_available_providers(self): return list(GPU_PROVIDERS)

    def SessionOptions(self):  # noqa: N802 - ORT's name
        return types.SimpleNamespace(add_session_config_entry=lambda k, v: None, optimized_model_filepath="")

    def RunOptions(self):  # noqa: N802 - ORT's name
        entries: dict[str, str] = {}
        return types.SimpleNamespace(add_run_config_entry=entries.__setitem__, entries=entries)

    def InferenceSession(self, path, options, providers=None, provider_options=None):  # noqa: N802
        return FakeSession(self, path, options, providers, provider_options)


@pytest.fixture
def fake_ort(monkeypatch):
    """Install a FakeOrt as `onnxruntime`, and a loader that 'loads' TensorRT's libraries (recorded)."""
    ort = FakeOrt()
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setitem(sys.modules, "onnxruntime.capi", ort.capi)
    monkeypatch.setitem(sys.modules, "onnxruntime.capi.build_and_package_info", ort.capi.build_and_package_info)
    monkeypatch.setattr(ort_tensorrt.ctypes, "CDLL", lambda name: ort.events.append(("load", name)))
    FakeOrtValue.made.clear()
    return ort


def test_tensorrt_ep_options_reach_the_unet_through_runtime_load(tiny_sd1_engine, fake_ort):
    manifest = load_manifest(tiny_sd1_engine)
    providers = ort_tensorrt_providers(tiny_sd1_engine, manifest, "unet", precision="fp32", workspace_gib=2)
    options = {"unet": {"providers": providers}, "*": {"providers": ["cpu"]}}
    with runtime.load(tiny_sd1_engine, backend="onnxruntime", options=options) as pipe:
        by_file = {s.path.rsplit("/", 1)[-1]: s for s in fake_ort.sessions}
        unet = by_file["unet.onnx"]
        assert unet.providers == GPU_PROVIDERS
        trt = unet.provider_options[0]
        assert trt == ort_tensorrt_provider_options(tiny_sd1_engine, manifest, "unet", precision="fp32",
                                                    workspace_gib=2)
        assert trt["trt_profile_max_shapes"].startswith("sample:8x4x") and trt["trt_fp16_enable"] is False
        assert trt["trt_max_workspace_size"] == 2 << 30
        assert unet.provider_options[1] == {"device_id": 0}
        others = {name: session.providers for name, session in by_file.items() if name != "unet.onnx"}
        assert {"text_encoder.onnx", "vae_decoder.onnx"} <= set(others)  # the VAE encoder opens on first use
        assert all(providers == ["CPUExecutionProvider"] for providers in others.values())
        assert pipe.engines["unet"].active_provider == "TensorrtExecutionProvider"
        assert pipe.engines["unet"].info.parallel is False  # device buffers are the engine's
        assert pipe.engines["text_encoder"].info.parallel is True
    # TensorRT 10's libraries were loaded before ORT was handed the TensorRT EP
    unet_session = fake_ort.events.index(("session", unet.path))
    loads = [i for i, e in enumerate(fake_ort.events) if e[0] == "load"]
    assert [fake_ort.events[i][1] for i in loads] == ["libnvinfer.so.10", "libnvonnxparser.so.10"]
    assert max(loads) < unet_session


def test_a_silent_fallback_from_the_tensorrt_ep_is_an_error(tiny_sd1_engine, fake_ort):
    """ORT carries on without a provider whose library does not load; that is not TensorRT."""
    fake_ort.taken = lambda requested: [p for p in requested if p != "TensorrtExecutionProvider"]
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims, "fp32")
    providers = ort_tensorrt_providers(tiny_sd1_engine, manifest, "unet", precision="fp32")
    with pytest.raises(ProviderFallbackError, match="TensorrtExecutionProvider was asked for first, but the ONNX "
                                                    "Runtime session runs on CUDAExecutionProvider, "
                                                    "CPUExecutionProvider") as e:
        OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=providers)
    assert isinstance(e.value, BackendError) and "libnvinfer.so.10" in str(e.value)


def test_tensorrt_libraries_that_do_not_load_are_named(tiny_sd1_engine, fake_ort, monkeypatch):
    def cdll(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(ort_tensorrt.ctypes, "CDLL", cdll)
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims, "fp32")
    providers = ort_tensorrt_providers(tiny_sd1_engine, manifest, "unet", precision="fp32")
    with pytest.raises(TensorRTLibrariesMissing, match=r"needs TensorRT 10's libraries for CUDA 12.*libnvinfer\.so\.10 "
                                                       r".*TensorRT 11 does not provide them.*ort-tensorrt-cu12"):
        OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=providers)
    assert fake_ort.sessions == []  # refused before ORT was asked


def test_bf16_is_gated_by_the_onnxruntime_version(tmp_path, tiny_sd1_engine):
    manifest = load_manifest(tiny_sd1_engine)
    with pytest.raises(BackendError, match=r"needs onnxruntime-gpu >= 1\.23; this is onnxruntime 1\.22\.0"):
        ort_tensorrt_provider_options(tmp_path, manifest, "unet", precision="bf16", ort_version="1.22.0")
    opts = ort_tensorrt_provider_options(tmp_path, manifest, "unet", precision="bf16", ort_version="1.23.0")
    assert opts["trt_bf16_enable"] is True and opts["trt_fp16_enable"] is False
    assert "trt_bf16_enable" not in ort_tensorrt_provider_options(tmp_path, manifest, "unet", precision="fp32",
                                                                  ort_version="1.22.0")


def test_cuda_graph_on_host_memory_is_refused(tiny_sd1_engine, fake_ort):
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims, "fp32")
    with pytest.raises(BackendError, match="a CUDA graph needs the CUDA or TensorRT execution provider first, with "
                                           "inputs and outputs bound to fixed device buffers; the first provider "
                                           "here is CPUExecutionProvider"):
        OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=["cpu"], cuda_graph=True)
    with pytest.raises(BackendError, match="captured by the first provider"):
        OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs,
                  providers=["tensorrt", ("cuda", {"enable_cuda_graph": "1"})])
    assert fake_ort.sessions == []


def _unet_feeds(batch: int, size: int, hidden: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, size, size), dtype=np.float32),
            "timestep": np.full((batch,), 500.5, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32)}


def test_cuda_graph_binds_fixed_device_buffers_and_keeps_one_shape(tiny_sd1_engine, fake_ort):
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims, "fp32")
    engine = OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=["cuda"], cuda_graph=True)
    session = fake_ort.sessions[-1]
    assert session.provider_options[0] == {"enable_cuda_graph": "1"}
    hidden = manifest.dims.text_hidden_size
    first = engine.run(_unet_feeds(2, 8, hidden, 0))
    buffers = list(FakeOrtValue.made)
    assert {v.device for v in buffers} == {"cuda:0"} and len(buffers) == 4  # 3 inputs + ORT's output
    feeds = _unet_feeds(2, 8, hidden, 1)
    second = engine.run(feeds)
    assert FakeOrtValue.made == buffers  # the same device buffers, refilled in place
    assert np.array_equal(engine._device_io.inputs["sample"].array, feeds["sample"])
    assert (first["noise_pred"] == 1).all() and (second["noise_pred"] == 2).all()
    with pytest.raises(EngineInputError, match="CUDA graph captured at input shapes"):
        engine.run(_unet_feeds(2, 16, hidden, 2))
    engine.close()


def test_cache_dir_is_skipped_with_the_tensorrt_ep(tiny_sd1_engine, fake_ort, tmp_path):
    manifest = load_manifest(tiny_sd1_engine)
    inputs, outputs = network_io("unet", manifest.dims, "fp32")
    providers = ort_tensorrt_providers(tiny_sd1_engine, manifest, "unet", precision="fp32")
    OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=providers, cache_dir=tmp_path / "c")
    assert fake_ort.sessions[-1].options.optimized_model_filepath == ""  # ORT cannot save compiled TensorRT nodes
    assert not (tmp_path / "c").exists()
    OrtEngine(tiny_sd1_engine / "unet.onnx", "unet", inputs, outputs, providers=["cuda"], cache_dir=tmp_path / "c")
    assert fake_ort.sessions[-1].options.optimized_model_filepath.startswith(str(tmp_path / "c"))
