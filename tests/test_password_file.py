"""Item 30: a broker password file others can change is refused, one others can read is warned about once.

For the device (``MqttLink``), the dashboard (``Ingest``) and ``read_password`` itself, with real files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edgemed.dashboard.ingest import Ingest
from edgemed.dashboard.store import DashboardStore
from edgemed.errors import ConfigError
from edgemed.publish.config import MqttConfig, read_password
from edgemed.publish.mqtt import MqttLink


def _password_file(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / f"pw-{mode:o}"
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


def _cfg(path: Path) -> MqttConfig:
    return MqttConfig(url="mqtt://127.0.0.1:1", username="dev", password_file=path)


def test_a_private_password_file_is_read_without_a_word(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert read_password(_cfg(_password_file(tmp_path, 0o600))) == "s3cret"
    assert read_password(_cfg(_password_file(tmp_path, 0o400))) == "s3cret"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604])
def test_a_password_file_others_can_read_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = _password_file(tmp_path, mode)
    for _ in range(3):
        assert read_password(_cfg(path)) == "s3cret"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"the broker password file {path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}`"
    ]
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666, 0o660])
def test_a_password_file_others_can_change_is_refused_by_device_and_dashboard(tmp_path: Path, mode: int) -> None:
    path = _password_file(tmp_path, mode)
    message = rf"password file {path} can be changed by other users \(mode 0{mode:o}\); run `chmod 600 {path}`"
    with pytest.raises(ConfigError, match=message):
        read_password(_cfg(path))
    with pytest.raises(ConfigError, match=message):
        MqttLink(_cfg(path), status_topic=None, client_id="edgemed-pw")
    store = DashboardStore(tmp_path / "d.sqlite3")
    try:
        with pytest.raises(ConfigError, match=message):
            Ingest(_cfg(path), store)
    finally:
        store.close()
