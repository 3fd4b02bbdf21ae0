"""The library's own errors: each is an `ExMeError` and the built-in exception of its kind."""

import pytest

from exme_callback import errors

KINDS = {
    errors.InputError: ValueError,
    errors.InputTypeError: TypeError,
    errors.MissingFileError: FileNotFoundError,
    errors.MissingNameError: KeyError,
    errors.UnsupportedError: NotImplementedError,
    errors.StorageError: OSError,
    errors.MissingExtraError: ImportError,
}


@pytest.mark.parametrize("error, builtin", KINDS.items(), ids=lambda e: getattr(e, "__name__", ""))
def test_each_error_is_its_builtin_kind_and_the_librarys_own(error, builtin):
    with pytest.raises(builtin) as caught:
        raise error("`x` must be positive, got -1")
    assert isinstance(caught.value, errors.ExMeError) and str(caught.value) == "`x` must be positive, got -1"


def test_every_error_the_module_lists_is_tested():
    assert {getattr(errors, name) for name in errors.__all__} == {errors.ExMeError, *KINDS}


def test_a_refusal_of_the_library_is_one_of_them():
    from exme_callback.settings import SearchSettings

    with pytest.raises(errors.ExMeError, match="`top_k` must be an integer >= 2"):
        SearchSettings(top_k=1)
