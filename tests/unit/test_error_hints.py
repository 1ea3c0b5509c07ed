"""Every error a user can hit names what to do: each PcipassError raised anywhere in pcipass
carries a hint, and every verdict code (the reasons claim refuses on) has one that fills in."""

from __future__ import annotations

import ast
from pathlib import Path

from pcipass.errors import NeedsRoot, PcipassError
from pcipass.host.verdict.judge import BLOCKING, REASONS, Reason, Verdict

SRC = Path(__file__).resolve().parents[2] / "src" / "pcipass"
ERRORS = {"PcipassError", "UsageError"}


def _error_calls():
    """(file, innermost enclosing function or the module, the call) for each error built."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        stack = [(tree, fn) for fn in ast.iter_child_nodes(tree)]
        while stack:
            owner, node = stack.pop()
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ERRORS:
                    yield path.relative_to(SRC), owner, node
            inner = node if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else owner
            stack.extend((inner, child) for child in ast.iter_child_nodes(node))


def test_every_error_raised_names_what_to_do():
    calls = list(_error_calls())
    assert len(calls) > 100  # the walk finds them
    missing = []
    for path, fn, call in calls:
        hint = next((k.value for k in call.keywords if k.arg == "hint"), None)
        where = f"{path}:{call.lineno}"
        if hint is None or (isinstance(hint, ast.Constant) and not hint.value):
            missing.append(where)
        elif isinstance(hint, ast.Name) and isinstance(fn, ast.FunctionDef):
            # A helper that passes its caller's hint on: its default, if it has one, is a real hint.
            args = fn.args.args + fn.args.kwonlyargs
            defaults = dict(zip([a.arg for a in fn.args.args][::-1], fn.args.defaults[::-1]))
            defaults.update({a.arg: d for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None})
            default = defaults.get(hint.id)
            if hint.id in [a.arg for a in args] and isinstance(default, ast.Constant) and not default.value:
                missing.append(where)
    assert not missing, f"errors without a hint (what the user should do): {missing}"


def test_needs_root_says_how():
    err = NeedsRoot("pcipass claim")
    assert "sudo" in err.hint and "hint: " in str(err)


def test_every_refusal_code_hands_claim_its_hint():
    for code, (severity, template) in REASONS.items():
        assert template.strip(), code
        if severity != BLOCKING:
            continue
        reason = Reason(code, f"a {code} finding", "0000:00:00.0")
        try:
            Verdict("0000:00:00.0", reasons=[reason]).refuse()
        except PcipassError as err:
            assert err.code == code and err.hint == reason.hint and f"[{code}]" in err.message
        else:
            raise AssertionError(f"{code} is blocking but refuse() let it through")
