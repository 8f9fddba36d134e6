"""firmware_configs/README.md and the README's profile table are generated, and current."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgemed import profile_reference as ref
from edgemed.config import DeviceProfile, load_profile

ROOT = Path(__file__).resolve().parent.parent


def test_the_profile_reference_is_current() -> None:
    # Fails when a config model or a profile changed without `scripts/profile-reference`.
    assert (ROOT / "firmware_configs" / "README.md").read_text(encoding="utf-8") == ref.render_reference()


def test_the_readme_profile_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert ref.readme_with_table(readme, ref.render_profile_table()) == readme


def test_every_key_of_every_section_is_documented_with_its_default() -> None:
    text = ref.render_reference()
    for prefix, model in ref._sections(DeviceProfile, ""):
        for name, field in model.model_fields.items():
            row = next((line for line in text.splitlines() if line.startswith(f"| `{prefix}{name}` |")), None)
            assert row is not None, f"{prefix}{name} is not in the reference"
            if field.description:
                assert ref._text(field.description) in row
    assert "| `triage.rules.LABEL.min_probability` | number (≥ 0.0, ≤ 1.0) | `0.5` |" in text
    assert "| `device.id` | string | required |" in text
    assert "None" not in text  # YAML says null


def test_the_table_says_what_each_file_says() -> None:
    table = ref.render_profile_table()
    for path in sorted((ROOT / "firmware_configs").glob("*.yaml")):
        profile = load_profile(path)
        row = next(line for line in table.splitlines() if line.startswith(f"| `{path.name}` |"))
        assert ("| yes |" in row) == profile.validated
        if profile.inference.accelerator != "cpu":
            assert ("| allowed |" in row) == profile.inference.allow_cpu_fallback
    derm = next(line for line in table.splitlines() if "dermatoscope-example.yaml" in line)
    assert "| Edge TPU (USB) | refused | watch folder |" in derm  # not "CPU, folder watch"


def test_check_mode_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "README.md"
    stale.write_text("# old\n")
    readme = tmp_path / "TOP.md"
    readme.write_text(f"intro\n{ref.TABLE_BEGIN}\n| old |\n{ref.TABLE_END}\nrest\n")
    monkeypatch.setattr(ref, "REFERENCE", stale)
    monkeypatch.setattr(ref, "README", readme)
    monkeypatch.setattr(ref, "ROOT", tmp_path)
    assert ref.main(["--check"]) == 1 and stale.read_text() == "# old\n"
    assert ref.main([]) == 0 and stale.read_text() == ref.render_reference()
    assert ref.render_profile_table() in readme.read_text() and readme.read_text().endswith("rest\n")
    assert ref.main(["--check"]) == 0


def test_the_first_run_profile_uses_the_demos_triage_policy() -> None:
    first = yaml.safe_load((ROOT / "firmware_configs" / "first-run.yaml").read_text())
    demo = yaml.safe_load((ROOT / "examples" / "breast-ultrasound-triage.yaml").read_text())
    assert first["triage"] == demo["triage"]
    profile = load_profile(ROOT / "firmware_configs" / "first-run.yaml")
    assert profile.mqtt is not None and profile.mqtt.broker.loopback and profile.mqtt.tls is None
    assert profile.source.uri is not None and profile.source.uri.startswith(str(Path.home()))
    assert profile.device.data_dir is not None and str(profile.device.data_dir).startswith(str(Path.home()))
