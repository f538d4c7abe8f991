"""maskopt.lazy: a missing optional package is one line on first use, never at import; a present one just works."""

import sys

import pytest

from maskopt.errors import MaskoptError
from maskopt.lazy import lazy_import, require


def test_a_missing_module_fails_on_first_use_not_before(monkeypatch):
    monkeypatch.setitem(sys.modules, "maskopt_missing", None)  # import maskopt_missing raises ImportError
    module = lazy_import("maskopt_missing", 'pip install -e ".[missing]"', reason="--missing needs it")
    with pytest.raises(MaskoptError) as e:
        module.anything
    assert str(e.value) == '--missing needs it: pip install -e ".[missing]"'
    with pytest.raises(MaskoptError, match="^maskopt_missing is not installed: pip install x$"):
        lazy_import("maskopt_missing", "pip install x").anything
    with pytest.raises(MaskoptError, match="^maskopt_missing is not installed: pip install x$"):
        require("maskopt_missing", "pip install x")


def test_a_present_module_works_and_is_the_module():
    import json

    lazy = lazy_import("json", "unused")
    assert lazy.dumps({"a": 1}) == '{"a": 1}' and lazy.JSONDecodeError is json.JSONDecodeError
    assert require("json", "unused") is json
    assert require("os.path", "unused") is sys.modules["os.path"]  # a submodule by its dotted name
    with pytest.raises(AttributeError):
        lazy.no_such_attribute  # the module's own AttributeError, not an install hint


def test_the_module_is_imported_at_first_use_and_found_again(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    lazy = lazy_import("colorsys", "unused")
    assert "colorsys" not in sys.modules  # nothing imported yet
    assert lazy.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert "colorsys" in sys.modules
    monkeypatch.setitem(sys.modules, "colorsys", None)  # uninstalled later: each use asks again
    with pytest.raises(MaskoptError, match="colorsys is not installed"):
        lazy.rgb_to_hsv
