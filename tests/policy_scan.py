"""What the tests of the shipped cloud policies share: the syntax of the provider's sources,
the calls found across them, and the actions a policy document (IAM's or RAM's statement
language) allows. Each cloud's test says how its code names a call."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = REPO / "providers"
POLICIES = PROVIDERS / "policies"


def syntax(path: Path) -> Iterator[ast.AST]:
    """Every node of a source file's syntax tree."""
    return ast.walk(ast.parse(path.read_text(), str(path)))


def calls_in(sources: Iterable[Path], scan: Callable[[Path], set[str]]) -> set[str]:
    """The calls ``scan`` finds in any of ``sources``."""
    return set().union(*(scan(p) for p in sources))


def allowed_actions(path: Path) -> set[str]:
    """The actions a policy's statements allow (all Allow, no wildcard)."""
    document = json.loads(path.read_text())
    actions: set[str] = set()
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow"
        listed = statement["Action"]
        actions.update([listed] if isinstance(listed, str) else listed)
    assert not any("*" in a for a in actions), f"{path.name}: no wildcard actions"
    return actions
