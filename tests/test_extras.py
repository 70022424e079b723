"""What a missing extra's ImportError says (the real thing: tests/test_install.py's venvs)."""

from __future__ import annotations

import pytest

from stream._extras import EXTRAS, install_hint, missing


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_the_message_names_the_extra_to_install(extra: str) -> None:
    error = missing(extra, ModuleNotFoundError("No module named 'httpx'", name="httpx"))
    assert isinstance(error, ImportError)
    assert error.name == "httpx"
    assert str(error) == f"{EXTRAS[extra]} needs httpx, which is not installed: " + (
        f"pip install 'flask-json-stream[{extra}]'"
    )
    assert install_hint(extra) in str(error)


def test_the_distribution_name_is_the_one_in_pyproject() -> None:
    import tomllib
    from pathlib import Path

    from stream import _extras

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["name"] == _extras.DISTRIBUTION
    assert set(pyproject["project"]["optional-dependencies"]) == set(EXTRAS) | {"all"}
