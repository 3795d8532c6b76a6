import pytest

from .harness import ResultsFile

_files: dict[str, ResultsFile] = {}


@pytest.fixture(scope="session")
def results():
    """results(device) -> the ResultsFile of that device; written when the session ends."""

    def get(device: str = "cpu") -> ResultsFile:
        return _files.setdefault(device, ResultsFile(device))

    yield get
    for f in _files.values():
        path = f.write()
        if path is not None:
            print(f"\nbenchmark results written to {path}")
