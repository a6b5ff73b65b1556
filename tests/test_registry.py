"""The one Registry class: register / get / create / list, refusal of a silent overwrite, actionable errors."""
import pytest

from equiray.errors import EquirayError
from equiray.registry import Registry


def test_register_as_decorator_and_create():
    reg = Registry("widget")

    @reg.register
    def square(x, *, scale=1):
        return x * x * scale

    @reg.register(name="cube")
    def _cube(x):
        return x ** 3

    assert reg.names() == ["cube", "square"]
    assert "square" in reg and "nope" not in reg
    assert reg.create("square", 3, scale=2) == 18
    assert reg.create("cube", 2) == 8
    assert reg.get("cube") is _cube
    assert len(reg) == 2 and list(reg) == ["cube", "square"]


def test_overwrite_is_refused_unless_asked():
    reg = Registry("widget")
    reg.register(int, name="a")
    reg.register(int, name="a")  # the same object again: harmless (re-import)
    with pytest.raises(EquirayError, match="already registered"):
        reg.register(float, name="a")
    reg.register(float, name="a", overwrite=True)
    assert reg.get("a") is float


def test_unknown_name_lists_choices_and_suggests():
    reg = Registry("canonicalizer")
    reg.register(dict, name="equivariant")
    reg.register(list, name="optimized")
    with pytest.raises(EquirayError, match=r"unknown canonicalizer 'equivarant'.*did you mean equivariant"):
        reg.get("equivarant")


def test_create_turns_bad_options_into_one_error():
    reg = Registry("widget")
    reg.register(lambda *, a: a, name="f")
    with pytest.raises(EquirayError, match=r"widget 'f' does not take these options \['b'\]"):
        reg.create("f", b=1)


def test_model_registry_refuses_a_silent_overwrite():
    from equiray.models import create_model, register_model

    with pytest.raises(EquirayError, match="already registered"):
        @register_model
        def small_cnn(**kwargs):  # noqa: F811 - the clash is the point
            raise AssertionError("never built")

    assert create_model("small_cnn").__class__.__name__ == "SmallCNN"
