import types

import choreograph


def test_all_lists_exactly_the_public_names() -> None:
    public = {
        name
        for name, value in vars(choreograph).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(choreograph.__all__) - {"__version__"} == public
    assert sorted(choreograph.__all__) == list(choreograph.__all__)


def test_every_exported_name_resolves() -> None:
    for name in choreograph.__all__:
        assert getattr(choreograph, name) is not None
