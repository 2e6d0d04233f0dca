"""The public names: ``choreograph.__all__`` is what it claims, and the error tree is as drawn."""

import importlib
import importlib.metadata
import inspect
import re
import types

import choreograph
from choreograph import errors


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(choreograph).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(choreograph.__all__) - {"__version__"} == public
    assert sorted(choreograph.__all__) == list(choreograph.__all__)


def test_every_exported_name_is_the_object_its_home_module_defines() -> None:
    # given every exported name but the version
    for name in set(choreograph.__all__) - {"__version__"}:
        value = getattr(choreograph, name)

        # then it is a class or a function defined under that name in a choreograph module
        assert inspect.isclass(value) or inspect.isfunction(value), name
        assert value.__name__ == name
        home = importlib.import_module(value.__module__)
        assert value.__module__.startswith("choreograph."), (name, value.__module__)
        assert getattr(home, name) is value, name


def test_version_is_the_installed_distribution_version() -> None:
    assert choreograph.__version__ == importlib.metadata.version("choreograph")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", choreograph.__version__)


def test_error_classes_form_the_tree_drawn_in_the_errors_module() -> None:
    # given the tree drawn at the top of choreograph/errors.py
    drawn: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        found = re.match(r"^(\s*(?:[│ ]   )*(?:[├└]── )?)([A-Z]\w+)", line)
        if found and hasattr(errors, found.group(2)):
            drawn.append((len(found.group(1)), found.group(2)))
    assert len(drawn) >= 10

    # then each class's direct base is the nearest class drawn above it one level up
    parents: list[tuple[int, str]] = []
    for depth, name in drawn:
        while parents and parents[-1][0] >= depth:
            parents.pop()
        cls = getattr(errors, name)
        expected_base = getattr(errors, parents[-1][1]) if parents else Exception
        assert cls.__bases__ == (expected_base,), name
        parents.append((depth, name))

    # and every exported exception is in the drawing
    exported = {
        name
        for name in choreograph.__all__
        if inspect.isclass(getattr(choreograph, name))
        and issubclass(getattr(choreograph, name), errors.ChoreographError)
    }
    assert exported <= {name for _, name in drawn}
