"""JSON as the flannel CNI plugin (Go, encoding/json) reads and writes it, and CNI errors.

The delegate config we save and hand to the bridge plugin must be the bytes flannel would
write: Go decodes every number into a float64 and marshals maps with sorted keys, structs in
field order, ``<``, ``>`` and ``&`` escaped, and no spaces. Imported by the plugin process on
every ADD, so it loads json and nothing heavier.
"""

from __future__ import annotations

import json
import math

# Error codes of the CNI specification.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT = 4
ERR_IO_FAILURE = 5
ERR_DECODING_FAILURE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_INTERNAL = 999

_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028"}
_GO_ESCAPES["\u2029"] = "\\u2029"


class CniError(Exception):
    """An error the plugin answers with: CNI error JSON on stdout and a non-zero exit."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def render(self, cni_version: str) -> bytes:
        body = {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }
        # ensure_ascii: whatever the input held (lone surrogates, control bytes), the answer
        # is still valid ASCII JSON.
        return json.dumps(body, indent=4).encode() + b"\n"


class GoStruct(dict):  # type: ignore[type-arg]
    """A value Go marshals from a struct: its keys keep their order instead of being sorted."""


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # Go refuses a number a float64 cannot hold; json would print Infinity (invalid JSON).
        raise ValueError(f"number {text} out of range")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


def decode(data: bytes) -> object:
    """Parse JSON as Go's json.Unmarshal into interface{} does: every number a float64.

    Raises ValueError with Go's sense of what is wrong (NaN, Infinity and out-of-range numbers
    are refused; invalid UTF-8 becomes U+FFFD, as Go does).
    """
    text = data.decode("utf-8", errors="replace")
    try:
        return json.loads(
            text, parse_int=_finite, parse_float=_finite, parse_constant=_refuse_constant
        )
    except RecursionError:
        raise ValueError("exceeded max depth") from None


def encode(value: object) -> bytes:
    """Marshal as Go's json.Marshal does (see the module docstring)."""
    parts: list[str] = []
    _encode(value, parts)
    return "".join(parts).encode("utf-8")


def _encode(value: object, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_string(value))
    elif value is None or isinstance(value, bool):
        out.append(json.dumps(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, dict):
        keys = list(value) if isinstance(value, GoStruct) else sorted(value)
        out.append("{")
        for i, key in enumerate(keys):
            if i:
                out.append(",")
            out.append(_string(str(key)))
            out.append(":")
            _encode(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (from a \\ud800 escape) is not UTF-8; Go writes U+FFFD for it.
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    encoded = json.dumps(text, ensure_ascii=False)
    for char, escape in _GO_ESCAPES.items():
        if char in encoded:
            encoded = encoded.replace(char, escape)
    return encoded


def _float(value: float) -> str:
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    text = repr(value)
    if "e" in text:
        if 1e-6 <= abs(value) < 1e21:
            # Go prints this range without an exponent.
            from decimal import Decimal

            return format(Decimal(text), "f")
        mantissa, exponent = text.split("e")
        sign = exponent[0] if exponent[0] in "+-" else "+"
        return f"{mantissa}e{sign}{int(exponent.lstrip('+-'))}"
    return text


def type_name(value: object) -> str:
    """The JSON type of a decoded value, in the words Go's errors use."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
