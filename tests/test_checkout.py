"""``threestudio_ssd.checkout.get_threestudio``: the one way the project obtains threestudio."""

from __future__ import annotations

import tarfile

import pytest

from threestudio_ssd import checkout
from threestudio_ssd.checkout import MARKER, THREESTUDIO_COMMIT, get_threestudio, missing_entries


def _snapshot(tmp_path, complete=True):
    src = tmp_path / "src" / "threestudio"
    (src / "threestudio").mkdir(parents=True)
    (src / "threestudio" / "__init__.py").write_text("__version__ = '0.2.3'\n")
    (src / "launch.py").write_text("# launch\n")
    (src / "extern").mkdir()
    if complete:
        (src / "load").mkdir()
    path = tmp_path / "threestudio-snapshot.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname="threestudio")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("THREESTUDIO_SRC", raising=False)
    monkeypatch.setenv("THREESTUDIO_SSD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_snapshot_is_extracted_once_into_the_cache(tmp_path, cache):
    path = get_threestudio(_snapshot(tmp_path), allow_clone=False)
    assert path == cache / f"threestudio-{THREESTUDIO_COMMIT[:7]}"
    assert not missing_entries(path) and (path / MARKER).read_text().strip() == THREESTUDIO_COMMIT
    (path / "launch.py").write_text("# kept\n")
    assert get_threestudio(tmp_path / "absent.tar.gz", allow_clone=False) == path  # not extracted again
    assert (path / "launch.py").read_text() == "# kept\n"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no partial folders left behind


def test_an_incomplete_checkout_is_redone(tmp_path, cache):
    dest = cache / f"threestudio-{THREESTUDIO_COMMIT[:7]}"
    (dest / "threestudio").mkdir(parents=True)  # an interrupted extraction: no marker
    path = get_threestudio(_snapshot(tmp_path), allow_clone=False)
    assert path == dest and (dest / MARKER).is_file() and (dest / "launch.py").is_file()


def test_a_snapshot_that_is_not_threestudio_is_refused(tmp_path, cache):
    with pytest.raises(RuntimeError, match="not a threestudio snapshot"):
        get_threestudio(_snapshot(tmp_path, complete=False), allow_clone=False)
    assert not (cache / f"threestudio-{THREESTUDIO_COMMIT[:7]}").exists()


def test_threestudio_src_wins_and_is_checked(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("THREESTUDIO_SRC", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"THREESTUDIO_SRC=.*lacks \['launch.py'"):
        get_threestudio(allow_clone=False)
    with tarfile.open(_snapshot(tmp_path)) as tar:
        tar.extractall(tmp_path / "mine", filter="data")
    monkeypatch.setenv("THREESTUDIO_SRC", str(tmp_path / "mine" / "threestudio"))
    assert get_threestudio(allow_clone=False) == (tmp_path / "mine" / "threestudio").resolve()


def test_nothing_available_without_cloning_names_what_was_tried(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="THREESTUDIO_SRC is unset.*absent.tar.gz.*cloning is disabled"):
        get_threestudio(tmp_path / "absent.tar.gz", allow_clone=False)


def test_clone_is_the_last_resort(tmp_path, cache, monkeypatch):
    """Without a snapshot it clones (faked here: no network in tests) the pinned commit."""
    calls = []

    def fake_clone(into):
        calls.append(into)
        with tarfile.open(_snapshot(tmp_path)) as tar:
            tar.extractall(into, filter="data")
        return into / "threestudio"

    monkeypatch.setattr(checkout, "_clone", fake_clone)
    path = get_threestudio(tmp_path / "absent.tar.gz")
    assert len(calls) == 1 and not missing_entries(path)


def test_cli_prints_the_path(tmp_path, cache, capsys):
    assert checkout.main(["--snapshot", str(_snapshot(tmp_path)), "--no-clone"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / f"threestudio-{THREESTUDIO_COMMIT[:7]}")
    assert checkout.main(["--snapshot", str(tmp_path / "none.tar.gz"), "--no-clone"]) == 0  # cached now
