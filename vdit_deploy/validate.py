"""Untrusted values in one place: the JSON in config.json, export metadata and calibration manifests,
and numeric command-line options. Each check raises one VditError line naming where and which field;
types are exact (a bool is not an integer, "3" is not a number) and numbers must be finite.
Torch-free."""
from __future__ import annotations

import math

from vdit_deploy.errors import VditError

INT32_MAX = 2 ** 31 - 1
FLOAT32_MAX = 3.4028234663852886e38
GUIDANCE_MAX = 100.0     # classifier-free guidance scales in use are 1..20; beyond 100 only overflow follows


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def fail(where: str, message: str):
    raise VditError(f"{where}: {message}" if where else message)


def integer(value, name: str, lo: int | None = None, hi: int | None = None, where: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        fail(where, f"{name} must be an integer, got {show(value)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        fail(where, f"{name} must be {_range(lo, hi)}, got {show(value)}")
    return value


def number(value, name: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           where: str = "") -> float:
    """A finite int or float in [lo, hi] ((lo, hi] with lo_open)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        fail(where, f"{name} must be a number, got {show(value)}")
    if not math.isfinite(value):
        fail(where, f"{name} must be a finite number, got {value}")
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        fail(where, f"{name} must be {_range(lo, hi, lo_open)}, got {show(value)}")
    return value


def guidance(value, where: str = "") -> float:
    """A classifier-free guidance scale: 0 (unconditional) .. GUIDANCE_MAX."""
    return number(value, "guidance scale", 0, GUIDANCE_MAX, where=where)


def _range(lo, hi, lo_open=False) -> str:
    if lo is not None and hi is not None:
        return f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}" if lo_open else f"between {lo:g} and {hi:g}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}"


def string(value, name: str, choices=None, where: str = "") -> str:
    if not isinstance(value, str):
        fail(where, f"{name} must be a string, got {show(value)}")
    if choices is not None and value not in choices:
        fail(where, f"{name} must be one of {', '.join(choices)}, got {show(value)}")
    return value


def boolean(value, name: str, where: str = "") -> bool:
    if not isinstance(value, bool):
        fail(where, f"{name} must be true or false, got {show(value)}")
    return value


def int_list(value, name: str, length: int | None = None, lo: int | None = None, hi: int | None = None,
             where: str = "") -> list[int]:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        fail(where, f"{name} must be a list of {length or ''} integers, got {show(value)}".replace("  ", " "))
    for v in value:
        integer(v, f"every entry of {name}", lo, hi, where)
    return value


def obj(value, name: str, required=(), optional=(), where: str = "", extra_ok: bool = False) -> dict:
    """A JSON object with the `required` keys, and no keys outside required + optional (unless extra_ok)."""
    if not isinstance(value, dict):
        fail(where, f"{name} must be a JSON object, got {type(value).__name__}")
    missing = [k for k in required if k not in value]
    if missing:
        fail(where, f"{name} lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in set(value) - set(required) - set(optional))
    if unknown and not extra_ok:
        fail(where, f"{name} has unknown field(s) {', '.join(unknown)}")
    return value


def sha256_hex(value, name: str, where: str = "") -> str:
    string(value, name, where=where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        fail(where, f"{name} must be 64 lowercase hex digits, got {show(value)}")
    return value


def regex(pattern: str, name: str, where: str = "") -> str:
    """A regular expression that compiles (users type them for --keep-fp and --layers)."""
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        fail(where, f"{name} {pattern!r} is not a valid regular expression: {e}")
    return pattern


def identifier(value, name: str, where: str = "") -> str:
    """A tensor name every stage can carry: ONNX, TensorRT bindings, Triton config and safetensors keys."""
    import re

    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", value):
        fail(where, f"{name} must be letters, digits and _ (not first), up to 64, got {show(value)}")
    return value
