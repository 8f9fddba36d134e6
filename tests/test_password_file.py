"""Item 30: a broker password file others can change is refused, one others can read is warned about once.

For the device (``MqttLink``), the dashboard (``Ingest``) and ``read_password`` itself, with real files.
"""

from __future__ import annotations

import logging
import os
import threading
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


OTHER_UID = 65534  # nobody


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("making a file that belongs to another user needs root (the suite's CI runs as root)")


def test_a_password_file_that_belongs_to_another_user_is_refused(tmp_path: Path) -> None:
    _needs_root()
    path = _password_file(tmp_path, 0o600)
    os.chown(path, OTHER_UID, -1)
    with pytest.raises(ConfigError, match=rf"password file {path} belongs to (nobody \()?uid {OTHER_UID}\)?, who"):
        read_password(_cfg(path))
    os.chown(path, 0, -1)  # root's own file is fine for any service user
    assert read_password(_cfg(path)) == "s3cret"


def test_a_link_is_resolved_once_and_what_it_points_at_is_checked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # /etc/edgemed secrets from configuration management are often links to a versioned file.
    private = _password_file(tmp_path, 0o600)
    link = tmp_path / "password"
    link.symlink_to(private)
    assert read_password(_cfg(link)) == "s3cret"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    shared = _password_file(tmp_path, 0o666)
    open_link = tmp_path / "open-password"
    open_link.symlink_to(shared)
    with pytest.raises(ConfigError, match=rf"{open_link} \(a link to {shared}\) can be changed by other users"):
        read_password(_cfg(open_link))
    if os.geteuid() == 0:  # a link someone else owns (as root the test can make one)
        os.lchown(link, OTHER_UID, -1)
        with pytest.raises(ConfigError, match=rf"{link} \(a link to {private}\): the link belongs to"):
            read_password(_cfg(link))


def test_a_fifo_or_folder_is_refused_at_once_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pw-fifo"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | str | None] = []

    def read() -> None:
        try:
            outcome.append(read_password(_cfg(fifo)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(3.0)
    if reader.is_alive():  # blocked in the read: give it an end of file so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5.0)
        pytest.fail("reading a FIFO named as password file blocked instead of being refused")
    assert isinstance(outcome[0], ConfigError) and "is not a regular file" in str(outcome[0])
    with pytest.raises(ConfigError, match=rf"password file {tmp_path} is not a regular file"):
        read_password(_cfg(tmp_path))
