"""The modules import one way: ``params`` (SamplingParams, the modes, the bounds, the input
checks) is a leaf, and the engine and the request models take their parameters from it, never from
``generate`` (which drives the engine)."""

import ast
from pathlib import Path

import twotower_rt

PACKAGE = Path(twotower_rt.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The package modules ``path`` imports at any level, as dotted names under twotower_rt."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
                names.add(".".join(target))
                names.update(".".join(target + [a.name]) for a in node.names)
            elif node.module and node.module.startswith("twotower_rt"):
                names.add(node.module.removeprefix("twotower_rt").lstrip("."))
        elif isinstance(node, ast.Import):
            names.update(a.name.removeprefix("twotower_rt").lstrip(".") for a in node.names
                         if a.name.startswith("twotower_rt"))  # fmt: skip
    return names


def test_params_is_a_leaf():
    assert imported_modules(PACKAGE / "params.py") == set()


def test_the_engine_and_the_request_models_do_not_import_generate():
    files = [*sorted((PACKAGE / "engine").glob("*.py")), PACKAGE / "protocol.py",
             PACKAGE / "batch.py", PACKAGE / "serve.py", PACKAGE / "chat.py"]  # fmt: skip
    for path in files:
        assert "generate" not in imported_modules(path), path


def test_the_checker_sees_relative_imports():
    """imported_modules itself: the engine's import of params is found (so the tests above can
    fail)."""
    assert "params" in imported_modules(PACKAGE / "engine" / "engine.py")
    assert "model.tower" in imported_modules(PACKAGE / "generate.py")


def test_the_public_names_stay_importable_from_generate():
    from twotower_rt import SamplingParams, generate, params

    assert generate.SamplingParams is params.SamplingParams is SamplingParams
    assert generate.check_input_ids is params.check_input_ids
