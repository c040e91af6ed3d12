"""A fake `tensorrt` module, to test the engine build and the TensorRT backend without a GPU, on
the fake device and cuda-python runtime of fake_cuda.py. A fake engine runs its ONNX file with
ONNX Runtime (CPU) on what it finds at its tensors' addresses, so a wrong address, size, shape or
a missing synchronisation gives wrong numbers.

It refuses what TensorRT refuses or leaves undefined, where this project's code could get it wrong:
- a context made with USER_MANAGED memory runs only once `set_device_memory` gave it a block of the
  engine's `device_memory_size_v2`;
- the first call at a context's shapes finishes its setup on the stream: a capture that begins
  before that work has run records a call that fails (so capture only after synchronizing, as
  trtexec does);
- a graph captured on a context records its shapes' generation: replaying it after the context's
  input shapes changed (TensorRT's guide: undefined behaviour) raises;
- a plan runs only on the TensorRT version that built it, but a version-compatible one that carries
  its lean runtime (built without EXCLUDE_LEAN_RUNTIME);
- the builder refuses (False) a timing cache from "another GPU" (a blob starting with b"other-gpu"),
  and then has no timing cache to give back.

Every public name of the fake modules is a real TensorRT or cuda-python name: tests check the
fake TensorRT's names against the TensorRT 10.x and 11.x bindings, and the fake runtime's against
the list the backend declares (`CUDART_NAMES`)."""

import enum
import json
import sys
import types
from pathlib import Path

import numpy as np

from fake_cuda import Device

VERSION = "11.4.0.106"


def make_tensorrt(
    device: Device, version: str = VERSION, lean: bool = False, strongly_typed_flag: bool = True
) -> types.ModuleType:
    """A tensorrt module (or tensorrt_lean: no builder) over `device`; engines are JSON plans naming
    their ONNX file, run with ONNX Runtime."""
    trt = types.ModuleType("tensorrt_lean" if lean else "tensorrt")
    trt.__version__ = version
    trt.DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "INT64": 9})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"VERSION_COMPATIBLE": 9, "EXCLUDE_LEAN_RUNTIME": 10})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ExecutionContextAllocationStrategy = enum.IntEnum(
        "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
    )
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1} if strongly_typed_flag else {}
    )
    dtypes = {
        "tensor(float)": trt.DataType.FLOAT,
        "tensor(float16)": trt.DataType.HALF,
        "tensor(int64)": trt.DataType.INT64,
        "tensor(int32)": trt.DataType.INT32,
        "tensor(bool)": trt.DataType.BOOL,
    }
    numpy_dtypes = {
        trt.DataType.FLOAT: np.float32,
        trt.DataType.HALF: np.float16,
        trt.DataType.INT64: np.int64,
        trt.DataType.INT32: np.int32,
        trt.DataType.BOOL: np.bool_,
    }

    class Logger:
        ERROR, WARNING = 1, 2

        def __init__(self, severity=2):
            self._severity = severity

    class Runtime:
        engine_host_code_allowed = False

        def __init__(self, logger):
            if not device.driver:
                raise SystemError(
                    "fake TensorRT: a Runtime without a CUDA driver is a null object (a real process "
                    "crashes on first use)"
                )
            device.runtimes.append(self)

        def deserialize_cuda_engine(self, data):
            try:
                plan = json.loads(bytes(data))
            except ValueError:
                return None
            compatible = "VERSION_COMPATIBLE" in plan["flags"]
            if (compatible and not self.engine_host_code_allowed) or (lean and not compatible):
                return None
            excluded = "EXCLUDE_LEAN_RUNTIME" in plan["flags"]  # then only this version's runtime runs it
            if plan["version"] != version and (not compatible or excluded):
                return None
            return ICudaEngine(plan)

    class ICudaEngine:
        def __init__(self, plan):
            import onnxruntime as ort

            self._plan = plan
            self._session = session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self._io = {t.name: (trt.TensorIOMode.INPUT, dtypes[t.type], t.shape) for t in session.get_inputs()}
            self._io |= {t.name: (trt.TensorIOMode.OUTPUT, dtypes[t.type], t.shape) for t in session.get_outputs()}

        @property
        def num_io_tensors(self):
            return len(self._io)

        def get_tensor_name(self, index):
            return list(self._io)[index]

        def get_tensor_mode(self, name):
            return self._io[name][0]

        def get_tensor_dtype(self, name):
            return self._io[name][1]

        @property
        def device_memory_size_v2(self):
            return 4096  # the activation block a context needs, for the profile's largest shapes

        def create_execution_context(self, strategy=trt.ExecutionContextAllocationStrategy.STATIC):
            device.calls["create_execution_context"] += 1
            return None if "create_execution_context" in device.fail else IExecutionContext(self, strategy)

    class IExecutionContext:
        def __init__(self, engine, strategy):
            self._engine, self._shapes, self._addresses = engine, {}, {}
            self._user_managed = strategy == trt.ExecutionContextAllocationStrategy.USER_MANAGED
            self._memory = None  # (address, size) from set_device_memory
            self._generation, self._ready = 0, None  # shapes changed so often; the generation set up

        def set_device_memory(self, memory, size):
            if not self._user_managed or size < self._engine.device_memory_size_v2:
                raise RuntimeError("fake TensorRT: set_device_memory needs USER_MANAGED and enough bytes")
            device.view(int(memory), int(size))  # inside an allocation
            self._memory = (int(memory), int(size))

        def set_input_shape(self, name, shape):
            low, _, high = self._engine._plan["profile"][name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
            shape = tuple(int(s) for s in shape)
            if self._shapes.get(name) != shape:
                self._shapes[name] = shape
                self._generation += 1
            return True

        def get_tensor_shape(self, name):
            mode, _, shape = self._engine._io[name]
            if mode == trt.TensorIOMode.INPUT:
                return self._shapes.get(name, tuple(-1 if not isinstance(d, int) else d for d in shape))
            batches = {s[0] for s in self._shapes.values()}
            complete = len(batches) == 1 and len(self._shapes) == len(self._engine._plan["profile"])
            batch = batches.pop() if complete else -1
            return tuple(d if isinstance(d, int) else batch for d in shape)

        def set_tensor_address(self, name, address):
            self._addresses[name] = int(address)
            return name in self._engine._io

        def execute_async_v3(self, stream_handle):
            stream = device.streams[stream_handle]
            device.calls["execute_async_v3"] += 1
            if "execute_async_v3" in device.fail:
                return False
            if stream.capture is not None and device.capture_fails:
                stream.invalidated = True
                return False
            io = self._engine._io
            inputs = {n for n in io if io[n][0] == trt.TensorIOMode.INPUT}
            if set(self._addresses) != set(io) or set(self._shapes) != inputs:
                return False
            if self._user_managed and self._memory is None:
                return False
            generation, capturing = self._generation, stream.capture is not None
            if capturing and self._ready != generation:  # the first call's setup has not run yet
                stream.invalidated = True
                return False
            if self._ready != generation:
                stream.enqueue(lambda: setattr(self, "_ready", generation))
            shapes, addresses = {name: self.get_tensor_shape(name) for name in io}, dict(self._addresses)
            stream.enqueue(lambda: self._compute(addresses, shapes, generation if capturing else None))
            return True

        def _compute(self, addresses, shapes, captured=None):
            if captured is not None and captured != self._generation:
                raise RuntimeError(
                    "fake TensorRT: a CUDA graph replayed after set_input_shape changed its context "
                    "(undefined behaviour in TensorRT)"
                )
            if self._memory is not None:
                device.view(*self._memory)  # the activation block is still allocated
            io, feeds = self._engine._io, {}
            for name, (mode, dtype, _) in io.items():
                if mode == trt.TensorIOMode.INPUT:
                    array_type = np.dtype(numpy_dtypes[dtype])
                    nbytes = int(np.prod(shapes[name])) * array_type.itemsize
                    feeds[name] = np.frombuffer(device.view(addresses[name], nbytes), array_type).reshape(shapes[name])
            names = [n for n in io if io[n][0] == trt.TensorIOMode.OUTPUT]
            for name, value in zip(names, self._engine._session.run(names, feeds)):
                value = np.ascontiguousarray(value * (1 + device.perturb) if device.perturb else value)
                if value.shape != shapes[name]:
                    raise RuntimeError(f"fake engine: {name} has shape {value.shape}, the context said {shapes[name]}")
                device.view(addresses[name], value.nbytes)[:] = value.tobytes()

    for cls in (Logger, Runtime):
        setattr(trt, cls.__name__, cls)
    trt.ICudaEngine, trt.IExecutionContext = ICudaEngine, IExecutionContext
    if not lean:
        _add_builder(trt, device, version)
    return trt


def _add_builder(trt, device: Device, version: str) -> None:
    class INetworkDefinition:
        def __init__(self, flags):
            self._flags, self._onnx = flags, None

    class OnnxParser:
        def __init__(self, network, logger):
            self._network, self._errors = network, []

        def parse_from_file(self, path):
            if not Path(path).is_file():
                self._errors.append(f"cannot open {path}")
                return False
            self._network._onnx = str(path)
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class IOptimizationProfile:
        def __init__(self):
            self._shapes = {}

        def set_shape(self, name, low, opt, high):
            self._shapes[name] = [list(low), list(opt), list(high)]

    class ITimingCache:
        def __init__(self, blob):
            self._blob = bytes(blob)

        def serialize(self):
            return self._blob + b"+"

    class IBuilderConfig:
        def __init__(self):
            self._flags, self._pools, self._profiles, self._cache = [], {}, [], None

        def set_memory_pool_limit(self, pool, size):
            self._pools[pool.name] = size

        def set_flag(self, flag):
            self._flags.append(flag.name)

        def create_timing_cache(self, blob):
            return ITimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache._blob.startswith(b"other-gpu"):
                return False
            self._cache = cache
            return True

        def get_timing_cache(self):
            return self._cache

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)
            return len(self._profiles) - 1

    class Builder:
        def __init__(self, logger):
            if not device.driver:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def create_network(self, flags=0):
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if "build_serialized_network" in device.fail or network._onnx is None or len(config._profiles) != 1:
                return None
            plan = {
                "onnx": network._onnx,
                "network_flags": network._flags,
                "flags": config._flags,
                "pools": config._pools,
                "profile": config._profiles[0]._shapes,
                "version": version,
            }
            device.plans.append(plan)
            return json.dumps(plan).encode()

    for cls in (Builder, OnnxParser, INetworkDefinition, IBuilderConfig, IOptimizationProfile, ITimingCache):
        setattr(trt, cls.__name__, cls)


def install(monkeypatch, trt, cudart) -> None:
    """Makes `import tensorrt` (or `tensorrt_lean`, with tensorrt absent) and cuda-python's runtime
    import the fakes for the rest of the test, and CuPy unimportable (the fake device cannot hold
    CuPy's arrays: backends default to NumPy outputs; tests pass a fake namespace instead)."""
    for name in ("cupy", "array_api_compat.cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    if trt is None:
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    elif trt.__name__ == "tensorrt_lean":
        monkeypatch.setitem(sys.modules, "tensorrt", None)
        monkeypatch.setitem(sys.modules, "tensorrt_lean", trt)
    else:
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime, cuda.cudart = bindings, cudart, cudart
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
        monkeypatch.setitem(sys.modules, name, module if cudart is not None else None)


def public_names(module: types.ModuleType) -> set[str]:
    """'Name' and 'Class.member' for every public attribute of a fake module and its classes."""
    names = set()
    for name, value in vars(module).items():
        if name.startswith("_") and name != "__version__" or isinstance(value, types.ModuleType):
            continue
        names.add(name)
        if isinstance(value, type) and issubclass(value, enum.Enum):
            names.update(f"{name}.{member}" for member in value.__members__)
        elif isinstance(value, type):
            names.update(f"{name}.{member}" for member in vars(value) if not member.startswith("_"))
    return names - {"__name__"}
