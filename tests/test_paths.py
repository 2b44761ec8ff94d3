"""The state directory: ``$TUNEFORGE_HOME``, and never the real ``~/.tuneforge`` while tests run."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge import paths

_SUBPROCESS = "from tuneforge.paths import state_dir; print(state_dir())"


def _real_state_dir() -> Path:
    """The user's own ``~/.tuneforge`` — from the password database, whatever $HOME says."""
    return (Path(pwd.getpwuid(os.getuid()).pw_dir) / ".tuneforge").resolve()


def _inside_real_state_dir(path: Path) -> bool:
    real, resolved = _real_state_dir(), Path(path).resolve()
    return resolved == real or real in resolved.parents


@pytest.fixture(scope="module")
def before_any_test() -> dict[str, Path]:
    """What module- and session-scoped fixtures see: they run before the per-test home is set."""
    child = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, check=True)
    return {"fixture": paths.state_dir(), "subprocess": Path(child.stdout.strip())}


def test_state_dir_is_never_the_real_home_during_tests(before_any_test: dict[str, Path], _isolated_home: Path) -> None:
    assert paths.state_dir().resolve() == _isolated_home.resolve()  # this test's own, fresh one
    child = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True, check=True)
    seen = {"test": paths.state_dir(), "test subprocess": Path(child.stdout.strip()), **before_any_test}
    for where, path in seen.items():
        assert not _inside_real_state_dir(path), f"{where}: state_dir() is {path}, under the real {_real_state_dir()}"
    assert before_any_test["fixture"].resolve() == before_any_test["subprocess"].resolve()  # one session home


def test_state_dir_follows_tuneforge_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "elsewhere"))
    assert paths.state_dir() == tmp_path / "elsewhere" and (tmp_path / "elsewhere").is_dir()
    assert paths.cache_dir("tokens") == tmp_path / "elsewhere" / "cache" / "tokens"
    assert paths.default_tracking_uri() == f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNEFORGE_HOME")
    assert paths.state_dir() == tmp_path / "home" / ".tuneforge"  # the default, under $HOME
