"""Strict fakes of `tensorrt` and cuda-python's runtime module, generated from recorded API surfaces.

THIS CHECKS API CONFORMANCE AND CONTROL FLOW, NOTHING ELSE. It never computes a number, never runs a
kernel, and never stands in for a GPU test (tests/test_trt_gpu.py is that). What it does:

  * Every class, method, property, enum member and constant comes from a surface recorded from the
    real binding wheels (tests/data/trt-api/, README there). Looking up anything else raises
    AttributeError, as the real module would; so does assigning a read-only property or an attribute
    a pybind11 object does not have.
  * Every call is bound against the recorded pybind11 overload signatures (argument count, keyword
    names, and the argument types pybind11 would reject: a float where an int goes, a tuple where an
    ILayer goes...): TypeError otherwise, as pybind11 raises.
  * cudart functions take the recorded parameters and return a tuple of the recorded length, the
    cudaError_t first, as cuda-python does; enums have the recorded members.
  * Behind the API, `World` keeps just enough state to check control flow: device allocations (sizes
    and frees), streams and their capture state (begin/end, invalidated by a failed launch), graphs
    and executable graphs (instantiated, launched, destroyed), loggers handed to TensorRT, what each
    engine build was asked for (flags, layer precisions, timing cache), and engines as JSON plans of
    their I/O. A few rules of the real libraries are modelled and say so where they are (`World`).

Not recorded, hand-made here and kept minimal: cuda-python's handle types (cudaStream_t, ...) and the
cudaDeviceProp struct, IHostMemory's buffer protocol (as __bytes__), ONNX parsing (the ONNX graph is
read with the onnx package; each node becomes a layer of the matching LayerType).
"""
from __future__ import annotations

import ctypes
import enum
import functools
import gzip
import json
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SURFACES = Path(__file__).parent / "data" / "trt-api"
TRT_SUPPORTED = ("10.3.0", "10.13.3.9", "10.16.1.11", "11.4.0.106")
TRT_UNSUPPORTED = ("8.6.1",)
CUDART_VERSIONS = ("11.8.7", "12.2.0", "12.9.10", "13.4.4")


@functools.cache
def surface(name: str) -> dict:
    """A recorded surface: 'api-10.3.0' (TensorRT) or 'cudart-12.2.0' (cuda-python's runtime)."""
    with gzip.open(SURFACES / f"{name}.json.gz", "rt") as f:
        return json.load(f)


class FakeGap(NotImplementedError):
    """A real API member the fake has no behaviour for: add behaviour to World, do not loosen the fake."""


# ---- call binding against recorded signatures --------------------------------------------------------
def _strip(type_name: str | None) -> str | None:
    return re.sub(r"^(nvinfer1|nvonnxparser)::(v_\d+_\d+::)?", "", type_name) if type_name else type_name


def _is_int(v) -> bool:
    return not isinstance(v, (float, np.floating, str, bytes)) and hasattr(v, "__index__")


def _type_ok(type_name, value, classes: dict) -> bool:
    """Would pybind11 accept `value` for a parameter of this recorded type? Lenient where unsure."""
    t = _strip(type_name)
    if t is None or t in ("object", "capsule") or t.startswith("typing_extensions.Capsule"):
        return True
    if t in ("int", "typing.SupportsInt"):
        return _is_int(value)
    if t in ("float", "typing.SupportsFloat"):
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if t == "bool":
        return isinstance(value, (bool, np.bool_, int))
    if t == "str":
        return isinstance(value, str)
    if t in ("buffer", "typing_extensions.Buffer"):
        try:
            memoryview(value)
            return True
        except TypeError:
            return False
    if t in ("tuple", "list"):
        return isinstance(value, {"tuple": tuple, "list": list}[t])
    if t in ("Dims", "Dims2", "Dims3", "Dims4", "DimsHW"):
        dims = classes.get("Dims")
        return (dims is not None and isinstance(value, dims)) or (
            isinstance(value, (tuple, list)) and all(_is_int(v) for v in value))
    m = re.fullmatch(r"(?:List|list|collections\.abc\.Sequence)\[(.*)\]", t)
    if m:
        return isinstance(value, (list, tuple)) and all(_type_ok(m.group(1), v, classes) for v in value)
    cls = classes.get(t)
    if isinstance(cls, type):
        return isinstance(value, cls)
    return True   # a type the fake does not model: do not guess


def bind_call(qualname: str, overloads: list, args: tuple, kwargs: dict, classes: dict) -> dict:
    """Bind a call to the first recorded overload that accepts it (pybind11's rule); TypeError if none."""
    if not overloads:
        raise TypeError(f"{qualname}: No constructor defined!")
    for overload in overloads:
        params = overload["params"]
        names = [p[0] for p in params]
        if len(args) > len(params):
            continue
        bound = dict(zip(names, args))
        ok = True
        for key, value in kwargs.items():
            if key not in names or key in bound or re.fullmatch(r"arg\d+", key):
                ok = False
                break
            bound[key] = value
        if not ok or any(name not in bound and default is None for name, _, default in params):
            continue
        if all(_type_ok(t, bound[name], classes) or (default == "None" and bound[name] is None)
               for name, t, default in params if name in bound and name != "self"):
            return bound
    signatures = "\n    ".join(o["signature"] for o in overloads)
    got = ", ".join([type(a).__name__ for a in args] + [f"{k}={type(v).__name__}" for k, v in kwargs.items()])
    raise TypeError(f"{qualname}(): incompatible function arguments. The following argument types are "
                    f"supported:\n    {signatures}\n\nInvoked with: {got}")


# ---- the state behind the API ---------------------------------------------------------------------------
@dataclass
class Stream:
    capture: str = "none"          # none | active | invalidated
    captured: list = field(default_factory=list)
    destroyed: bool = False


@dataclass
class World:
    """What the fake GPU, driver and TensorRT remember. Modelled rules of the real libraries:
      - a stream in capture mode stays there until cudaStreamEndCapture; a failed launch during capture
        invalidates it (EndCapture then returns cudaErrorStreamCaptureInvalidated); synchronizing a
        capturing stream is an error (cudaErrorStreamCaptureUnsupported);
      - IExecutionContext.execute_async_v3 returns False unless every dynamic input shape is set and
        every I/O tensor has a live device allocation large enough for its current shape;
      - a strongly typed network (every network on TensorRT 11) refuses weak-typing precision flags
        and layer precisions: build_serialized_network returns None;
      - IBuilderConfig has TF32 set by default;
      - a timing cache made on another GPU or TensorRT is refused by set_timing_cache(..., False)
        and accepted by set_timing_cache(..., True); undecodable bytes give create_timing_cache None."""
    trt_version: str = "10.13.3.9"
    gpu: str = "NVIDIA H100 80GB HBM3"
    compute_capability: tuple = (9, 0)
    fail_launch_in_capture: bool = False     # an engine that cannot be captured (plugins, DLA)
    fail_instantiate: bool = False
    device: dict = field(default_factory=dict)       # pointer -> bytes
    host: dict = field(default_factory=dict)         # pinned pointer -> ctypes buffer
    streams: dict = field(default_factory=dict)      # int handle -> Stream
    events: set = field(default_factory=set)
    graphs: set = field(default_factory=set)         # live cudaGraph_t
    graph_execs: set = field(default_factory=set)    # live cudaGraphExec_t
    launches: list = field(default_factory=list)     # ("execute" | "graph", engine or exec id), eager order
    loggers: list = field(default_factory=list)      # every logger handed to Builder / OnnxParser / Runtime
    loggers_created: int = 0
    builds: list = field(default_factory=list)       # what each build_serialized_network call saw
    uploads: list = field(default_factory=list)      # (device pointer, bytes) of each host-to-device copy
    used: set = field(default_factory=set)           # "Class.member" / "module.attr" looked up successfully
    captured: dict = field(default_factory=dict)     # cudaGraph_t -> what its capture recorded
    exec_ops: dict = field(default_factory=dict)     # cudaGraphExec_t -> the same
    next_handle: int = 0x1000
    # What a test says an engine's kernels write to an output tensor, one entry per run (eager or graph
    # replay), by tensor name: the fake computes nothing, a download of such a buffer reads the entry.
    kernel_writes: dict = field(default_factory=dict)   # output name -> [bytes, ...]
    contents: dict = field(default_factory=dict)        # device pointer -> the bytes last scripted there
    contexts: dict = field(default_factory=dict)        # id(IExecutionContext) -> it (for graph replays)

    def handle(self) -> int:
        self.next_handle += 0x100
        return self.next_handle

    def run_kernels(self, context) -> None:
        """An engine ran: the scripted writes of its outputs land at their bound addresses."""
        for name, io in context._fake["engine"]._fake["io"].items():
            queue = self.kernel_writes.get(name)
            if io["mode"] != "INPUT" and queue:
                self.contents[context._fake["addresses"][name]] = queue.pop(0)

    def check_device(self, ptr, nbytes: int) -> bool:
        """[ptr, ptr + nbytes) lies inside one live device allocation."""
        base = next((p for p, size in self.device.items() if p <= int(ptr) < p + size), None)
        return base is not None and int(ptr) + nbytes <= base + self.device[base]

    def leaks(self) -> dict:
        """Everything allocated and not released (empty after a clean close)."""
        live = {"device": dict(self.device), "host": list(self.host), "events": set(self.events),
                "graphs": set(self.graphs), "graph_execs": set(self.graph_execs),
                "streams": [h for h, s in self.streams.items() if not s.destroyed]}
        return {k: v for k, v in live.items() if v}


# ---- enums -------------------------------------------------------------------------------------------
class _EnumMember:
    """A pybind11 enum value: name, value, int(), ==, hash; members live on the enum class."""

    def __init__(self, enum_name, name, value):
        object.__setattr__(self, "_fake", (enum_name, name, int(value)))

    name = property(lambda self: self._fake[1])
    value = property(lambda self: self._fake[2])

    def __int__(self):
        return self._fake[2]

    __index__ = __int__

    def __eq__(self, other):
        return type(other) is type(self) and other._fake[2] == self._fake[2]

    def __hash__(self):
        return hash((type(self).__name__, self._fake[2]))

    def __repr__(self):
        return f"<{self._fake[0].split('.')[-1]}.{self._fake[1]}: {self._fake[2]}>"

    def __setattr__(self, name, value):
        raise AttributeError(f"can't set attribute {name!r} of an enum value")


class _Recording(type):
    """Metaclass: records every successful class-attribute lookup (World.used), to prove coverage."""

    def __getattribute__(cls, name):
        value = type.__getattribute__(cls, name)
        if not name.startswith("_") or name == "__init__":
            world = type.__getattribute__(cls, "_world")
            if world is not None:
                world.used.add(f"{type.__getattribute__(cls, '_qualname')}.{name}")
        return value


def _make_enum(qualname: str, members: dict, world: World) -> type:
    def new(cls, value):
        for member in cls._members.values():
            if member.value == int(value):
                return member
        raise ValueError(f"{value} is not a valid {qualname}")

    ns = {"__new__": new, "__init__": lambda self, *args: None, "_qualname": qualname, "_world": world,
          "_members": {}}
    cls = _Recording(qualname.split(".")[-1], (_EnumMember,), ns)
    for name, value in members.items():
        member = object.__new__(cls)
        _EnumMember.__init__(member, qualname, name, value)
        cls._members[name] = member
        type.__setattr__(cls, name, member)
    return cls


# ---- TensorRT classes ----------------------------------------------------------------------------------
class _Fake:
    """Base of every generated TensorRT class. Instances keep their state in `_fake` (a dict) and
    refuse attributes the recorded class lacks, like a pybind11 object without a __dict__."""

    _qualname = "?"
    _world: World | None = None

    def __setattr__(self, name, value):
        if name == "_fake":
            object.__setattr__(self, name, value)
            return
        if name == "__class__":   # the downcast polygraphy does: legal only to a class the object really is
            true = self._fake.get("true_class", type(self))
            if not (isinstance(value, type) and issubclass(true, value)):
                raise TypeError(f"{true.__name__} object cast to {getattr(value, '__name__', value)}: "
                                f"undefined behaviour in the real bindings")
            object.__setattr__(self, name, value)
            return
        for klass in type(self).__mro__:
            if name in klass.__dict__:
                descriptor = klass.__dict__[name]
                if isinstance(descriptor, property):
                    descriptor.__set__(self, value)   # AttributeError when read-only
                    return
                break
        if type(self).__dict__.get("_generated"):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' (and no __dict__)")
        object.__setattr__(self, name, value)   # a Python subclass (a calibrator, a progress monitor)


def _method(world, cls_name, name, overloads, classes):
    def method(self, *args, **kwargs):
        bound = bind_call(f"{cls_name}.{name}", overloads, (self, *args), kwargs, classes)
        bound.pop("self", None)
        for klass in type(self).__mro__:   # behaviour for this class or the one that declares it
            impl = getattr(Behaviour, f"{getattr(klass, '_qualname', klass.__name__)}__{name}", None)
            if impl is not None:
                return impl(world, self, **bound)
        raise FakeGap(f"{cls_name}.{name}")
    method.__name__ = name
    return method


def _init(world, cls_name, overloads, classes):
    def __init__(self, *args, **kwargs):
        bound = bind_call(f"{cls_name}.__init__", overloads, (self, *args), kwargs, classes)
        bound.pop("self", None)
        object.__setattr__(self, "_fake", {})
        impl = getattr(Behaviour, f"{cls_name}____init__", None)
        if impl is not None:
            impl(world, self, **bound)
    return __init__


def _property(world, cls_name, name, spec, classes):
    def get(self):
        for klass in type(self).__mro__:
            impl = getattr(Behaviour, f"{getattr(klass, '_qualname', klass.__name__)}__{name}", None)
            if impl is not None:
                return impl(world, self)
        if name in self._fake:
            return self._fake[name]
        raise FakeGap(f"{cls_name}.{name} (read before any write)")

    def put(self, value):
        if not _type_ok(spec.get("type"), value, classes) and value is not None:
            raise TypeError(f"{cls_name}.{name}: incompatible type {type(value).__name__}, "
                            f"expected {spec.get('type')}")
        self._fake[name] = value
    return property(get, put if spec.get("settable") else None)


def make_tensorrt(version: str, world: World) -> types.ModuleType:
    """A strict `tensorrt` module for the recorded TensorRT `version` (see the module docstring)."""
    api = surface(f"api-{version}")
    module = _StrictModule("tensorrt", world)
    classes: dict = {}
    for qualname, members in api["enums"].items():
        classes[qualname] = _make_enum(qualname, members, world)
    if "ILogger.Severity" in classes:   # Logger.Severity is ILogger's, inherited
        classes["Logger.Severity"] = classes["ILogger.Severity"]

    def build(name):
        if name in classes:
            return classes[name]
        spec = api["classes"][name]
        bases = tuple(build(b) for b in spec["bases"] if b in api["classes"]) or (_Fake,)
        ns = {"_qualname": name, "_world": world, "_generated": True}
        cls = _Recording(name, bases, ns)
        classes[name] = cls
        return cls

    for name in api["classes"]:
        build(name)
    for name, spec in api["classes"].items():
        cls = classes[name]
        if "enum" in spec:
            continue   # made from api["enums"] above
        for member, m in spec.get("members", {}).items():
            if m["kind"] in ("method", "staticmethod"):
                fn = (_init(world, name, m["overloads"], classes) if member == "__init__"
                      else _method(world, name, member, m["overloads"], classes))
                type.__setattr__(cls, member, staticmethod(fn) if m["kind"] == "staticmethod" else fn)
            elif m["kind"] == "property":
                type.__setattr__(cls, member, _property(world, name, member, m, classes))
            elif m["kind"] == "class":
                type.__setattr__(cls, member, classes.get(m["qualname"]))
            elif m["kind"] == "attribute":
                enum_name, value = re.fullmatch(r"<(\w+)\.(\w+): -?\d+>", m["repr"]).groups()
                owner = classes.get(f"{name}.{enum_name}") or classes.get(f"ILogger.{enum_name}")
                type.__setattr__(cls, member, getattr(owner, value))
        if "__init__" not in spec.get("members", {}):
            type.__setattr__(cls, "__init__", _init(world, name, [], classes))
    for name, cls in classes.items():
        if "." not in name:
            module._set(name, cls)
    for name, value in api["constants"].items():
        m = re.fullmatch(r"<(\w+)\.(\w+): -?\d+>", value)
        if m and m.group(1) in classes:
            module._set(name, getattr(classes[m.group(1)], m.group(2)))
    for name, spec in api["functions"].items():
        module._set(name, _function(world, name, spec["overloads"], classes))
    module._set("__version__", api["tensorrt_version"])
    module._classes = classes
    world.trt_version = api["tensorrt_version"]
    return module


def _function(world, name, overloads, classes):
    def function(*args, **kwargs):
        bound = bind_call(name, overloads, args, kwargs, classes)
        impl = getattr(Behaviour, f"tensorrt__{name}", None)
        if impl is None:
            raise FakeGap(f"tensorrt.{name}")
        return impl(world, **bound)
    function.__name__ = name
    return function


class _StrictModule(types.ModuleType):
    """A module whose public attributes are exactly the recorded ones; lookups are recorded."""

    def __init__(self, name, world):
        super().__init__(name)
        object.__setattr__(self, "_world", world)

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if not name.startswith("_") or name == "__version__":
            object.__getattribute__(self, "_world").used.add(f"{object.__getattribute__(self, '__name__')}.{name}")
        return value

    def __setattr__(self, name, value):
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"the fake {self.__name__} module does not take new attributes ({name})")


# ---- cuda-python's runtime -------------------------------------------------------------------------------
class Handle:
    """cudaStream_t, cudaEvent_t, cudaGraph_t, cudaGraphExec_t: opaque, int() gives the address.
    (Hand-made: the surfaces record functions and enums, not these types.) No __index__: TensorRT's
    int parameters need an explicit int(), as with cuda-python's own handle types."""

    def __init__(self, kind: str, value: int):
        self.kind, self.value = kind, value

    def __int__(self):
        return self.value

    def __repr__(self):
        return f"<{self.kind} {self.value:#x}>"


@dataclass
class DeviceProp:
    """The few cudaDeviceProp fields vdit reads (hand-made; the struct is not in the surfaces)."""
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int


def make_cudart(version: str, world: World) -> types.ModuleType:
    """A strict cudart module for the recorded cuda-python `version`."""
    api = surface(f"cudart-{version}")
    module = _StrictModule(api["module"], world)
    module._enums = {}
    for name, members in api["enums"].items():
        if name.startswith("cuda"):
            module._enums[name] = enum.IntEnum(name, members)
            module._set(name, module._enums[name])
    for name, spec in api["functions"].items():
        module._set(name, _cuda_function(world, module, name, spec))
    module._surface = api
    return module


def _cuda_function(world, module, name, spec):
    params, returns = spec["params"] or [], spec["returns"]

    def function(*args, **kwargs):
        names = [p[0] for p in params]
        if len(args) > len(params):
            raise TypeError(f"{name}() takes {len(params)} positional arguments but {len(args)} were given")
        bound = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in names or key in bound:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            bound[key] = value
        missing = [n for n, default in params if n not in bound and default is None]
        if missing:
            raise TypeError(f"{name}() missing required arguments: {', '.join(missing)}")
        impl = getattr(CudaBehaviour, name, None)
        if impl is None:
            raise FakeGap(f"cudart.{name}")
        err, *values = impl(world, module, len(returns), **bound)
        if len(values) != len(returns) - 1:
            raise AssertionError(f"fake bug: {name} returns {len(returns)} items in cuda-python {module}")
        error = module._enums["cudaError_t"][err]
        if int(error) != 0:
            values = [None] * len(values)   # cuda-python returns (err, None, ...) on failure
        return (error, *values)
    function.__name__ = name
    return function


class CudaBehaviour:
    """What each cudart function does to the World. Each returns (error name, *values after the error)."""

    @staticmethod
    def _stream(world, stream) -> Stream | None:
        s = world.streams.get(int(stream))
        return None if s is None or s.destroyed else s

    def cudaGetDeviceCount(world, m, n):
        return "cudaSuccess", 1

    def cudaGetDeviceProperties(world, m, n, device):
        if int(device) != 0:
            return "cudaErrorInvalidDevice", None
        name = world.gpu.encode().ljust(256, b"\x00")
        return "cudaSuccess", DeviceProp(name, *world.compute_capability, 80 << 30)

    def cudaSetDevice(world, m, n, device):
        return ("cudaSuccess",) if int(device) == 0 else ("cudaErrorInvalidDevice",)

    def cudaGetLastError(world, m, n):
        return ("cudaSuccess",)

    def cudaStreamCreateWithFlags(world, m, n, flags):
        h = world.handle()
        world.streams[h] = Stream()
        return "cudaSuccess", Handle("cudaStream_t", h)

    def cudaStreamDestroy(world, m, n, stream):
        s = CudaBehaviour._stream(world, stream)
        if s is None:
            return ("cudaErrorInvalidResourceHandle",)
        s.destroyed = True
        return ("cudaSuccess",)

    def cudaStreamSynchronize(world, m, n, stream):
        s = CudaBehaviour._stream(world, stream)
        if s is None:
            return ("cudaErrorInvalidResourceHandle",)
        if s.capture != "none":
            s.capture = "invalidated"
            return ("cudaErrorStreamCaptureUnsupported",)
        return ("cudaSuccess",)

    def cudaStreamBeginCapture(world, m, n, stream, mode):
        s = CudaBehaviour._stream(world, stream)
        if not isinstance(mode, m._enums["cudaStreamCaptureMode"]):
            raise TypeError(f"cudaStreamBeginCapture: mode must be a cudaStreamCaptureMode, got {mode!r}")
        if s is None or s.capture != "none":
            return ("cudaErrorIllegalState",)
        s.capture, s.captured = "active", []
        return ("cudaSuccess",)

    def cudaStreamEndCapture(world, m, n, stream):
        s = CudaBehaviour._stream(world, stream)
        if s is None or s.capture == "none":
            return "cudaErrorIllegalState", None
        state, s.capture = s.capture, "none"
        if state == "invalidated":
            return "cudaErrorStreamCaptureInvalidated", None
        h = world.handle()
        world.graphs.add(h)
        world.captured[h] = list(s.captured)
        return "cudaSuccess", Handle("cudaGraph_t", h)

    def cudaStreamIsCapturing(world, m, n, stream):
        s = CudaBehaviour._stream(world, stream)
        status = {"none": "cudaStreamCaptureStatusNone", "active": "cudaStreamCaptureStatusActive",
                  "invalidated": "cudaStreamCaptureStatusInvalidated"}[s.capture]
        return "cudaSuccess", m._enums["cudaStreamCaptureStatus"][status]

    def _instantiate(world, graph):
        if graph is None or int(graph) not in world.graphs or world.fail_instantiate:
            return "cudaErrorInvalidValue", None
        h = world.handle()
        world.graph_execs.add(h)
        world.exec_ops[h] = world.captured[int(graph)]
        return "cudaSuccess", Handle("cudaGraphExec_t", h)

    def cudaGraphInstantiateWithFlags(world, m, n, graph, flags):
        return CudaBehaviour._instantiate(world, graph)

    def cudaGraphInstantiate(world, m, n, graph, **rest):   # (graph, flags) or 11.8's (graph, log, size)
        return (*CudaBehaviour._instantiate(world, graph), *([None] * (n - 2)))

    def cudaGraphDestroy(world, m, n, graph):
        if int(graph) not in world.graphs:
            return ("cudaErrorInvalidValue",)
        world.graphs.discard(int(graph))
        return ("cudaSuccess",)

    def cudaGraphExecDestroy(world, m, n, graphExec):
        if int(graphExec) not in world.graph_execs:
            return ("cudaErrorInvalidValue",)
        world.graph_execs.discard(int(graphExec))
        return ("cudaSuccess",)

    def cudaGraphLaunch(world, m, n, graphExec, stream):
        s = CudaBehaviour._stream(world, stream)
        if s is None or int(graphExec) not in world.graph_execs:
            return ("cudaErrorInvalidValue",)
        (s.captured if s.capture != "none" else world.launches).append(("graph", int(graphExec)))
        for op in world.exec_ops.get(int(graphExec), []) if s.capture == "none" else ():
            if op[0] == "execute":
                world.run_kernels(world.contexts[op[1]])
        return ("cudaSuccess",)

    def cudaMalloc(world, m, n, size):
        ptr = world.handle() << 20
        world.device[ptr] = int(size)
        return "cudaSuccess", ptr

    def cudaFree(world, m, n, devPtr):
        if world.device.pop(int(devPtr), None) is None:
            return ("cudaErrorInvalidValue",)
        return ("cudaSuccess",)

    def cudaMallocHost(world, m, n, size):
        buffer = (ctypes.c_char * int(size))()
        ptr = ctypes.addressof(buffer)
        world.host[ptr] = buffer
        return "cudaSuccess", ptr

    def cudaFreeHost(world, m, n, ptr):
        return ("cudaSuccess",) if world.host.pop(int(ptr), None) is not None else ("cudaErrorInvalidValue",)

    def cudaMemset(world, m, n, devPtr, value, count):
        return ("cudaSuccess",) if world.check_device(devPtr, int(count)) else ("cudaErrorInvalidValue",)

    def cudaMemsetAsync(world, m, n, devPtr, value, count, stream):
        s = CudaBehaviour._stream(world, stream)
        if s is None:
            return ("cudaErrorInvalidResourceHandle",)
        if s.capture != "none":
            s.captured.append(("memset", int(count)))
        world.contents.pop(int(devPtr), None)
        return ("cudaSuccess",) if world.check_device(devPtr, int(count)) else ("cudaErrorInvalidValue",)

    def _copy(world, m, dst, src, count, kind):
        kinds = m._enums["cudaMemcpyKind"]
        if not isinstance(kind, kinds):
            raise TypeError(f"cudaMemcpy: kind must be a cudaMemcpyKind, got {kind!r}")
        device = {kinds.cudaMemcpyHostToDevice: [dst], kinds.cudaMemcpyDeviceToHost: [src],
                  kinds.cudaMemcpyDeviceToDevice: [dst, src]}.get(kind, [])
        ok = all(world.check_device(p, int(count)) for p in device)
        if ok and kind == kinds.cudaMemcpyHostToDevice:
            world.uploads.append((int(dst), int(count)))
        if ok and kind == kinds.cudaMemcpyDeviceToHost:
            # nothing is computed, so a download reads zeros (never the garbage of an uninitialised array)
            # or what a test scripted a kernel to write there (World.kernel_writes)
            ctypes.memset(int(dst), 0, int(count))
            data = world.contents.get(int(src))
            if data is not None:
                ctypes.memmove(int(dst), data, min(len(data), int(count)))
        return "cudaSuccess" if ok else "cudaErrorInvalidValue"   # host memory is otherwise never touched

    def cudaMemcpy(world, m, n, dst, src, count, kind):
        return (CudaBehaviour._copy(world, m, dst, src, count, kind),)

    def cudaMemcpyAsync(world, m, n, dst, src, count, kind, stream):
        s = CudaBehaviour._stream(world, stream)
        err = CudaBehaviour._copy(world, m, dst, src, count, kind)
        if s is not None and s.capture != "none":
            s.captured.append(("copy", kind.name))
        return (err if s is not None else "cudaErrorInvalidResourceHandle",)

    def cudaEventCreateWithFlags(world, m, n, flags):
        h = world.handle()
        world.events.add(h)
        return "cudaSuccess", Handle("cudaEvent_t", h)

    def cudaEventRecord(world, m, n, event, stream):
        ok = int(event) in world.events and CudaBehaviour._stream(world, stream) is not None
        return ("cudaSuccess",) if ok else ("cudaErrorInvalidResourceHandle",)

    def cudaEventSynchronize(world, m, n, event):
        return ("cudaSuccess",) if int(event) in world.events else ("cudaErrorInvalidResourceHandle",)

    def cudaEventDestroy(world, m, n, event):
        if int(event) not in world.events:
            return ("cudaErrorInvalidResourceHandle",)
        world.events.discard(int(event))
        return ("cudaSuccess",)


for _name, _fn in list(vars(CudaBehaviour).items()):
    if callable(_fn) and not isinstance(_fn, staticmethod) and not _name.startswith("__"):
        setattr(CudaBehaviour, _name, staticmethod(_fn))


# ---- TensorRT behaviour --------------------------------------------------------------------------------
ONNX_DTYPES = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL"}
BINARY = {"Add": "SUM", "Sub": "SUB", "Mul": "PROD", "Div": "DIV", "Pow": "POW", "Max": "MAX", "Min": "MIN",
          "Equal": "EQUAL", "Less": "LESS", "Greater": "GREATER", "And": "AND", "Or": "OR",
          # the ONNX parser lowers these to GREATER / LESS and EQUAL, then their OR: the fake records the OR
          "GreaterOrEqual": "OR", "LessOrEqual": "OR"}
LAYER_OF_OP = {
    **{op: "ELEMENTWISE" for op in BINARY},
    **{op: "REDUCE" for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2")},
    **{op: "UNARY" for op in ("Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Sin", "Cos", "Erf", "Not",
                              "Floor", "Ceil", "IsNaN")},
    **{op: "ACTIVATION" for op in ("Relu", "Sigmoid", "Tanh", "Clip")},
    **{op: "NORMALIZATION" for op in ("LayerNormalization", "GroupNormalization", "InstanceNormalization")},
    **{op: "SHUFFLE" for op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")},
    **{op: "SLICE" for op in ("Slice", "Split", "Expand")},
    "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION",
    "Shape": "SHAPE", "Gather": "GATHER", "Concat": "CONCATENATION", "Constant": "CONSTANT", "Cast": "CAST",
    "Where": "SELECT", "Identity": "IDENTITY", "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
    "ConstantOfShape": "FILL", "Range": "FILL", "Einsum": "EINSUM", "Resize": "RESIZE",
    # what the video DiT families' graphs add (the ONNX parser's operator support, TensorRT 10.x): Wan's and
    # HunyuanVideo's index writes, Mochi's per-prompt token selection and padding, HunyuanVideo's repeat
    "ScatterND": "SCATTER", "ScatterElements": "SCATTER", "GatherND": "GATHER", "NonZero": "NON_ZERO",
    "Pad": "SLICE", "Tile": "SLICE",
}
LAYER_CLASS = {"ELEMENTWISE": "IElementWiseLayer", "REDUCE": "IReduceLayer", "SOFTMAX": "ISoftMaxLayer",
               "NORMALIZATION": "INormalizationLayer"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
         "BOOL": np.bool_, "UINT8": np.uint8}
WEAK_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")


def _new(module, cls_name, **state):
    """An instance of a generated class, made the way the bindings make return values (no __init__)."""
    obj = object.__new__(module._classes[cls_name])
    object.__setattr__(obj, "_fake", dict(state))
    return obj


def _enum(module, enum_name, member):
    """An enum member, looked up without counting as a use by the code under test (World.used)."""
    return module._classes[enum_name]._members[member]


def _dims(trt, shape):
    return _new(trt, "Dims", shape=tuple(int(d) for d in shape))


class Behaviour:
    """What each TensorRT member does. Named Class__member; `world` first, then the bound arguments."""

    # -- logger, builder, network, parser
    def Logger____init__(world, self, min_severity=None):
        world.loggers_created += 1

    def Builder____init__(world, self, logger):
        world.loggers.append(logger)
        self._fake.update(trt=world.trt)

    def Builder__create_network(world, self, flags=0):
        trt = self._fake["trt"]
        typed = trt._classes["NetworkDefinitionCreationFlag"]._members.get("STRONGLY_TYPED")
        strong = world.trt_version.startswith("11.") or bool(typed is not None and int(flags) & (1 << int(typed)))
        return _new(trt, "INetworkDefinition", trt=trt, flags=int(flags), strong=strong, inputs=[], layers=[],
                    outputs=[])

    def Builder__create_builder_config(world, self):
        trt = self._fake["trt"]
        return _new(trt, "IBuilderConfig", trt=trt, set_flags={_enum(trt, "BuilderFlag", "TF32")}, profiles=[],
                    timing_cache=None)

    def Builder__create_optimization_profile(world, self):
        return _new(self._fake["trt"], "IOptimizationProfile", shapes={}, valid=True)

    def OnnxParser____init__(world, self, network, logger):
        world.loggers.append(logger)
        self._fake.update(network=network, errors=[])

    def OnnxParser__parse_from_file(world, self, model):
        import onnx

        network = self._fake["network"]
        trt = network._fake["trt"]
        try:
            proto = onnx.shape_inference.infer_shapes(onnx.load(model, load_external_data=False))
        except Exception as e:   # noqa: BLE001  (the real parser reports, it does not raise)
            self._fake["errors"].append(f"{model}: {e}")
            return False
        g = proto.graph
        info = {v.name: v for v in [*g.input, *g.value_info, *g.output]}

        def tensor(name):
            t = info[name].type.tensor_type if name in info else None
            dtype = _enum(trt, "DataType", ONNX_DTYPES.get(t.elem_type, "FLOAT") if t else "FLOAT")
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim) if t else ()
            return _new(trt, "ITensor", name=name, dtype=dtype, shape=_dims(trt, shape))

        initializers = {i.name for i in g.initializer}
        network._fake["inputs"] = [tensor(v.name) for v in g.input if v.name not in initializers]
        for i, node in enumerate(g.node):
            kind = LAYER_OF_OP.get(node.op_type)
            if kind is None:
                self._fake["errors"].append(f"node {node.name}: the fake parser maps no layer to {node.op_type}")
                return False
            layer = _new(trt, "ILayer", name=node.name or f"{node.op_type}_{i}", type=_enum(trt, "LayerType", kind),
                         outputs=[tensor(o) for o in node.output], precision=None, output_types={},
                         true_class=trt._classes[LAYER_CLASS.get(kind, "ILayer")])
            if kind == "ELEMENTWISE":
                layer._fake["op"] = _enum(trt, "ElementWiseOperation", BINARY[node.op_type])
            network._fake["layers"].append(layer)
        network._fake["outputs"] = [tensor(v.name) for v in g.output]
        return True

    def OnnxParser__num_errors(world, self):
        return len(self._fake["errors"])

    def OnnxParser__get_error(world, self, index):
        return self._fake["errors"][index]

    def INetworkDefinition__num_inputs(world, self):
        return len(self._fake["inputs"])

    def INetworkDefinition__get_input(world, self, index):
        return self._fake["inputs"][index]

    def INetworkDefinition__num_layers(world, self):
        return len(self._fake["layers"])

    def INetworkDefinition__get_layer(world, self, index):
        layer = self._fake["layers"][index]
        object.__setattr__(layer, "__class__", self._fake["trt"]._classes["ILayer"])   # a plain ILayer
        return layer

    def INetworkDefinition__num_outputs(world, self):
        return len(self._fake["outputs"])

    def ITensor__name(world, self):
        return self._fake["name"]

    def ITensor__shape(world, self):
        return self._fake["shape"]

    def ITensor__dtype(world, self):
        return self._fake["dtype"]

    def ILayer__name(world, self):
        return self._fake["name"]

    def ILayer__type(world, self):
        return self._fake["type"]

    def ILayer__num_outputs(world, self):
        return len(self._fake["outputs"])

    def ILayer__get_output(world, self, index):
        return self._fake["outputs"][index]

    def ILayer__precision(world, self):
        return self._fake["precision"] or self._fake["outputs"][0]._fake["dtype"]

    def ILayer__set_output_type(world, self, index, dtype):
        self._fake["output_types"][int(index)] = dtype

    def IElementWiseLayer__op(world, self):
        return self._fake["op"]

    def Dims____len__(world, self):
        return len(self._fake["shape"])

    def Dims____getitem__(world, self, arg0):
        return self._fake["shape"][arg0]   # IndexError past the end ends iteration, as in the bindings

    # -- builder config
    def IBuilderConfig__set_flag(world, self, flag):
        self._fake["set_flags"].add(flag)

    def IBuilderConfig__clear_flag(world, self, flag):
        self._fake["set_flags"].discard(flag)

    def IBuilderConfig__get_flag(world, self, flag):
        return flag in self._fake["set_flags"]

    def IOptimizationProfile__set_shape(world, self, input, min, opt, max):
        lo, mid, hi = (tuple(_tuple(d)) for d in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi))):
            self._fake["valid"] = False
        self._fake["shapes"][input] = (lo, mid, hi)

    def IBuilderConfig__add_optimization_profile(world, self, profile):
        if not profile._fake["valid"]:
            return -1
        self._fake["profiles"].append(profile)
        return len(self._fake["profiles"]) - 1

    def IBuilderConfig__set_calibration_profile(world, self, profile):
        return profile._fake["valid"]

    def IBuilderConfig__set_memory_pool_limit(world, self, pool, pool_size):
        self._fake.setdefault("pools", {})[pool.name] = int(pool_size)

    def IBuilderConfig__can_run_on_DLA(world, self, layer):
        return layer._fake["type"].name != "NORMALIZATION"

    def IBuilderConfig__create_timing_cache(world, self, serialized_timing_cache):
        blob = bytes(serialized_timing_cache)
        if blob and not blob.startswith(b"FAKE-TIMING-CACHE"):
            return None
        made = json.loads(blob[len(b"FAKE-TIMING-CACHE"):]) if blob else {"gpu": world.gpu, "trt": world.trt_version}
        return _new(self._fake["trt"], "ITimingCache", made=made)

    def IBuilderConfig__set_timing_cache(world, self, cache, ignore_mismatch):
        here = cache._fake["made"] == {"gpu": world.gpu, "trt": world.trt_version}
        if not here and not ignore_mismatch:
            return False
        self._fake["timing_cache"] = cache
        return True

    def ITimingCache__serialize(world, self):
        return _new(world.trt, "IHostMemory",
                    data=b"FAKE-TIMING-CACHE" + json.dumps({"gpu": world.gpu, "trt": world.trt_version}).encode())

    def IHostMemory__nbytes(world, self):
        return len(self._fake["data"])

    # -- the build
    def Builder__build_serialized_network(world, self, network, config, kernel_text=None):
        trt, c = self._fake["trt"], config._fake
        flags = sorted(f.name for f in c["set_flags"])
        layers = network._fake["layers"]
        record = {"flags": flags, "strongly_typed": network._fake["strong"],
                  "precisions": {l._fake["name"]: l._fake["precision"].name for l in layers if l._fake["precision"]},
                  "output_types": {l._fake["name"]: {i: t.name for i, t in l._fake["output_types"].items()}
                                   for l in layers if l._fake["output_types"]},
                  "layer_types": {l._fake["name"]: l._fake["type"].name for l in layers},
                  "timing_cache": c["timing_cache"] is not None, "calibrated": False,
                  "profiles": [dict(p._fake["shapes"]) for p in c["profiles"]],
                  "progress_monitor": c.get("progress_monitor") is not None,
                  "settings": {k: getattr(v, "name", v) for k, v in c.items()
                               if k in ("pools", "builder_optimization_level", "DLA_core", "default_device_type")}}
        world.builds.append(record)
        if network._fake["strong"] and (set(flags) & set(WEAK_FLAGS) or record["precisions"] or record["output_types"]):
            return None   # strongly typed networks take neither precision flags nor layer precisions
        monitor = c.get("progress_monitor")
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            for step in range(2):
                if not monitor.step_complete("Building engine", step):
                    monitor.phase_finish("Building engine")
                    return None
            monitor.phase_finish("Building engine")
        calibrator = c.get("int8_calibrator")
        if calibrator is not None and "INT8" in flags:
            if not _is_int(calibrator.get_batch_size()):
                raise TypeError("get_batch_size must return an int")
            if calibrator.read_calibration_cache() is None:
                names = [t._fake["name"] for t in network._fake["inputs"]]
                while (pointers := calibrator.get_batch(names)) is not None:
                    assert len(pointers) == len(names) and all(world.check_device(p, 1) for p in pointers)
                    record["calibrated"] = True
                calibrator.write_calibration_cache(b"FAKE-CALIBRATION-CACHE")
        profile = c["profiles"][0]._fake["shapes"] if c["profiles"] else {}
        io = [{"name": t._fake["name"], "mode": "INPUT", "dtype": t._fake["dtype"].name,
               "shape": list(t._fake["shape"]._fake["shape"]), "profile": profile.get(t._fake["name"])}
              for t in network._fake["inputs"]]
        io += [{"name": t._fake["name"], "mode": "OUTPUT", "dtype": t._fake["dtype"].name,
                "shape": list(t._fake["shape"]._fake["shape"]), "profile": None} for t in network._fake["outputs"]]
        plan = {"trt": world.trt_version, "io": io}
        return _new(trt, "IHostMemory", data=b"FAKE-ENGINE" + json.dumps(plan).encode())

    # -- runtime
    def Runtime____init__(world, self, logger):
        world.loggers.append(logger)
        self._fake.update(trt=world.trt)

    def Runtime__deserialize_cuda_engine(world, self, serialized_engine):
        blob = bytes(serialized_engine)
        if not blob.startswith(b"FAKE-ENGINE"):
            return None
        plan = json.loads(blob[len(b"FAKE-ENGINE"):])
        if plan["trt"] != world.trt_version:
            return None   # plans are tied to the TensorRT version that built them
        return _new(self._fake["trt"], "ICudaEngine", trt=self._fake["trt"], io={t["name"]: t for t in plan["io"]},
                    names=[t["name"] for t in plan["io"]])

    def ICudaEngine__num_io_tensors(world, self):
        return len(self._fake["names"])

    def ICudaEngine__get_tensor_name(world, self, index):
        return self._fake["names"][index]

    def ICudaEngine__get_tensor_mode(world, self, name):
        return _enum(self._fake["trt"], "TensorIOMode", self._fake["io"][name]["mode"])

    def ICudaEngine__get_tensor_dtype(world, self, name):
        return _enum(self._fake["trt"], "DataType", self._fake["io"][name]["dtype"])

    def ICudaEngine__get_tensor_shape(world, self, name):
        return _dims(self._fake["trt"], self._fake["io"][name]["shape"])

    def ICudaEngine__get_tensor_profile_shape(world, self, name, profile_index):
        profile = self._fake["io"][name]["profile"]
        if profile is None or int(profile_index) != 0:
            raise RuntimeError(f"no profile shapes for {name}")   # the real bindings raise too
        return [_dims(self._fake["trt"], s) for s in profile]

    def ICudaEngine__create_execution_context(world, self, strategy=None, runtime_config=None):
        return _new(self._fake["trt"], "IExecutionContext", engine=self, shapes={}, addresses={})

    def IExecutionContext__set_input_shape(world, self, name, shape):
        io = self._fake["engine"]._fake["io"].get(name)
        shape = tuple(_tuple(shape))
        if io is None or io["mode"] != "INPUT" or len(shape) != len(io["shape"]):
            return False
        lo, _, hi = io["profile"] or (io["shape"],) * 3
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self._fake["shapes"][name] = shape
        return True

    def IExecutionContext__get_tensor_shape(world, self, name):
        # an input: the shape set_input_shape gave it (-1 where none was given, as TensorRT says);
        # an output: its dynamic axis is taken as the batch of the inputs set (the fake infers no more)
        io = self._fake["engine"]._fake["io"][name]
        if io["mode"] == "INPUT":
            return _dims(self._fake["engine"]._fake["trt"], self._fake["shapes"].get(name) or io["shape"])
        batch = next(iter(self._fake["shapes"].values()), (-1,))[0]
        shape = tuple(batch if d == -1 else d for d in io["shape"])
        return _dims(self._fake["engine"]._fake["trt"], shape)

    def IExecutionContext__set_tensor_address(world, self, name, memory):
        if name not in self._fake["engine"]._fake["io"] or int(memory) == 0:
            return False
        self._fake["addresses"][name] = int(memory)
        return True

    def IExecutionContext__execute_async_v3(world, self, stream_handle):
        engine = self._fake["engine"]._fake
        stream = world.streams.get(int(stream_handle))
        if stream is None or stream.destroyed:
            return False
        for name, io in engine["io"].items():
            shape = Behaviour.IExecutionContext__get_tensor_shape(world, self, name)._fake["shape"]
            if -1 in shape or name not in self._fake["addresses"]:
                return False
            nbytes = int(np.prod(shape)) * np.dtype(NUMPY[io["dtype"]]).itemsize
            if not world.check_device(self._fake["addresses"][name], max(nbytes, 1)):
                return False
        if stream.capture != "none":
            if world.fail_launch_in_capture:
                stream.capture = "invalidated"
                return False
            stream.captured.append(("execute", id(self)))
        else:
            world.launches.append(("execute", id(self)))
            world.run_kernels(self)
        world.contexts[id(self)] = self
        return True

    def tensorrt__nptype(world, trt_type):
        return NUMPY[trt_type.name]


def _tuple(dims):
    return dims._fake["shape"] if isinstance(dims, _Fake) else tuple(dims)


for _name, _fn in list(vars(Behaviour).items()):
    if callable(_fn) and not _name.startswith("__"):
        setattr(Behaviour, _name, staticmethod(_fn))


def _host_memory_bytes(self):
    return self._fake["data"]


# ---- installing both fakes -----------------------------------------------------------------------------
def install(monkeypatch, trt_version: str, cudart_version: str, world: World | None = None) -> World:
    """Put fake `tensorrt` and cuda-python modules in sys.modules (undone by monkeypatch) and tell
    vdit a GPU device node exists. Returns the World they share."""
    from vdit_deploy.runtimes import engine_cache

    world = world or World()
    trt = make_tensorrt(trt_version, world)
    type.__setattr__(trt._classes["IHostMemory"], "__bytes__", _host_memory_bytes)   # the buffer protocol
    cudart = make_cudart(cudart_version, world)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cuda = types.ModuleType("cuda")
    cuda.__path__ = []
    if cudart.__name__ == "cuda.cudart":   # cuda-python < 12.6: no cuda.bindings
        cuda.cudart = cudart
        monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
        monkeypatch.setitem(sys.modules, "cuda.bindings", None)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    else:
        bindings = types.ModuleType("cuda.bindings")
        bindings.__path__ = []
        bindings.runtime = cudart
        cuda.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
        monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setattr(engine_cache, "nvidia_device_present", lambda: True)
    world.trt, world.cudart = trt, cudart
    return world
