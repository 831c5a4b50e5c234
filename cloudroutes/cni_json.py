"""JSON as the flannel CNI plugin (Go, encoding/json) reads and writes it, and CNI errors.

The delegate config we save and hand to the bridge plugin must be the bytes flannel would
write: Go decodes every number into a float64 and marshals maps with sorted keys, structs in
field order, ``<``, ``>`` and ``&`` escaped, and no spaces. Imported by the plugin process on
every ADD, so it loads json and nothing heavier.
"""

from __future__ import annotations

import math

try:
    # CPython's C half of the json module. The Python half imports re, 10 ms of every pod's
    # start; it is loaded only to word an error about input that does not parse.
    from _json import encode_basestring, encode_basestring_ascii, make_scanner
except ImportError:  # another interpreter: the json module proper
    from json.encoder import encode_basestring, encode_basestring_ascii
    from json.scanner import make_scanner

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
        """The answer, laid out as Go's CNI library prints it, ASCII whatever the input held."""
        fields = (
            ("cniVersion", encode_basestring_ascii(cni_version)),
            ("code", str(self.code)),
            ("msg", encode_basestring_ascii(self.msg)),
            ("details", encode_basestring_ascii(self.details)),
        )
        body = ",\n".join(f'    "{key}": {value}' for key, value in fields)
        return f"{{\n{body}\n}}\n".encode("ascii")


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


class _Rules:
    """Go's reading of JSON, for the scanner: strict strings, every number a finite float64."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_finite)
    parse_int = staticmethod(_finite)
    parse_constant = staticmethod(_refuse_constant)
    memo: dict[str, str] = {}


_scan = make_scanner(_Rules())
_WHITESPACE = " \t\n\r"


def decode(data: bytes) -> object:
    """Parse JSON as Go's json.Unmarshal into interface{} does: every number a float64.

    Raises ValueError with Go's sense of what is wrong (NaN, Infinity and out-of-range numbers
    are refused; invalid UTF-8 becomes U+FFFD, as Go does).
    """
    text = data.decode("utf-8", errors="replace")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except RecursionError:
        raise ValueError("exceeded max depth") from None
    except Exception:
        # Not JSON. The scanner's own error needs the json module loaded to be worded: let
        # the json module read it again and say what is wrong.
        return _explain(text)
    if text[end:].strip(_WHITESPACE):
        return _explain(text)
    return value


def _explain(text: str) -> object:
    import json

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
    elif value is None:
        out.append("null")
    elif isinstance(value, bool):
        out.append("true" if value else "false")
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
    encoded = encode_basestring(text)
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
