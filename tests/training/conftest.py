import pytest

from tests.kit import style_data


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The small procedural style dataset of tests.kit.style_data (one per test module)."""
    return style_data.make_small_pandora18k(str(tmp_path_factory.mktemp("styles")))
