"""What the manifest says must be what runs: a model's real tensors and output op are checked at load.

A real float32 model from our converter (softmax kept) is put in place of the real int8 model, with the manifest
edited by hand (sha256 recomputed) the way a careless or hostile edit would; the device, the doctor and the
bundler must each refuse it, naming the field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgemed.cli import main
from edgemed.errors import ModelError
from edgemed.inference import BackendConfig, interpreter_module, make_backend
from edgemed.inference.backends import graph_output_kind, graph_weights, open_interpreter
from edgemed.manifest import load_manifest, sha256_file, verify_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def float_model(int8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The int8 fixture's own Keras model converted to float32 with its softmax (in a subprocess: no TensorFlow
    in the test process)."""
    out = tmp_path_factory.mktemp("float") / "breast_float32.tflite"
    code = (
        "import sys; from pathlib import Path; from converters.testing import build_float_model; "
        "build_float_model(Path(sys.argv[1]), Path(sys.argv[2]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(int8_model.parent), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return out


_CONVERT = """
import sys
from pathlib import Path
from converters.convert import calibration_sample, to_tflite
from converters.data import load_dataset
from converters.source import load_source
from converters.testing import BREASTMNIST, BREAST_LABELS
source = load_source(Path(sys.argv[1]) / "keras" / "breast.keras", strip_softmax=False, taps=False)
calib = calibration_sample(load_dataset(BREASTMNIST, labels=BREAST_LABELS))
for target in sys.argv[3:]:
    (Path(sys.argv[2]) / f"breast_{target}.tflite").write_bytes(to_tflite(source, target, calib))
"""


@pytest.fixture(scope="module")
def float_targets(int8_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The int8 fixture's own Keras model converted by our converter to float16 and dynamic-range TFLite files
    (softmax kept), in a subprocess: no TensorFlow in the test process."""
    out = tmp_path_factory.mktemp("targets")
    proc = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(int8_model.parent), str(out), "float16", "dynamic"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return {target: out / f"breast_{target}.tflite" for target in ("float16", "dynamic")}


def _copy(int8_model: Path, into: Path) -> tuple[Path, Path]:
    shutil.copytree(int8_model.parent, into, ignore=shutil.ignore_patterns("keras", "DONE"))
    return into / int8_model.name, next(into.glob("*.manifest.json"))


def _edit(manifest_path: Path, model: Path, **fields: Any) -> None:
    """Hand-edit the model's artifact entry and recompute its sha256 and size, as the attacker in the issue did."""
    raw = json.loads(manifest_path.read_text())
    art = next(a for a in raw["artifacts"] if a["file"] == model.name)
    art.update(fields, sha256=sha256_file(model), size_bytes=model.stat().st_size)
    manifest_path.write_text(json.dumps(raw))


def _float_specs(model: Path) -> dict[str, Any]:
    _, module = interpreter_module()
    interp = open_interpreter(module, model, 1)

    def spec(d: dict[str, Any]) -> dict[str, Any]:
        scale, zero = d["quantization"]
        return {"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "scale": float(scale), "zero_point": int(zero)}  # fmt: skip

    (output,) = interp.get_output_details()  # the float files here have a single output: their scores
    return {"input": spec(interp.get_input_details()[0]), "output": spec(output),
            "outputs": [{**spec(output), "role": "scores"}]}  # fmt: skip


def test_the_graph_tells_logits_from_probabilities(int8_model: Path, tmp_path: Path) -> None:
    _, module = interpreter_module()
    assert graph_output_kind(open_interpreter(module, int8_model, 1)) == "logits"
    # A graph whose output op the check cannot read (here: no op details at all) is not guessed at.
    assert graph_output_kind(object()) is None


@pytest.mark.slow
def test_a_float_model_listed_as_int8_is_refused_by_the_device_the_doctor_and_the_bundler(
    int8_model: Path, float_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, module = interpreter_module()
    assert graph_output_kind(open_interpreter(module, float_model, 1)) == "probabilities"
    model, manifest_path = _copy(int8_model, tmp_path / "m")
    shutil.copy(float_model, model)
    _edit(manifest_path, model)
    manifest, _ = verify_model(model)  # the sha256 matches: that check alone would run it
    with pytest.raises(ModelError) as info:
        make_backend(model, BackendConfig(), manifest=manifest)
    message = str(info.value)
    assert "artifacts[0].target is int8 but the model's tensors are float32" in message
    assert "artifacts[0].input.dtype is int8 but the model's is float32" in message
    assert "artifacts[0].output.zero_point is" in message
    assert "artifacts[0].output_kind is logits but the model's output op computes probabilities" in message

    code = main(["run", "--model", str(model), "--source", str(ROOT / "data" / "isic_samples"),
                 "--device-id", "d1", "--data-dir", str(tmp_path / "d")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 3, err
    assert "does not match its manifest" in err and "artifacts[0].target" in err
    assert not (tmp_path / "d" / "results.jsonl").exists() or not (tmp_path / "d" / "results.jsonl").read_text()

    assert main(["doctor", "--model", str(model), "--data-dir", str(tmp_path / "doc")]) == 2
    out = capsys.readouterr().out
    assert "FAIL  model" in out and "artifacts[0].target is int8" in out

    profile = tmp_path / "p.yaml"
    profile.write_text(
        f"profile: t\ndevice: {{id: d1}}\nmodel: {{path: {model}}}\nsource: {{uri: 'watch:/srv/in'}}\n"
        "triage: {rules: {malignant: {level: urgent, min_probability: 0.4}}}\n"
    )
    assert main(["bundle", "--profile", str(profile), "--out", str(tmp_path / "out")]) == 3
    assert "artifacts[0].target is int8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_an_edit_that_fixes_the_tensors_but_not_the_output_kind_is_refused(
    int8_model: Path, float_model: Path, float_targets: dict[str, Path], tmp_path: Path
) -> None:
    model, manifest_path = _copy(int8_model, tmp_path / "m")
    shutil.copy(float_model, model)
    _edit(manifest_path, model, target="float16", **_float_specs(model))
    manifest = load_manifest(manifest_path)
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.output_kind is logits .* apply a softmax to probabilit"):
        make_backend(model, BackendConfig(), manifest=manifest)

    # Told the truth, a float16 model runs and its probabilities are not squeezed by a second softmax.
    shutil.copy(float_targets["float16"], model)
    _edit(manifest_path, model, target="float16", output_kind="probabilities", **_float_specs(model))
    from edgemed.runtime import Classifier

    manifest = load_manifest(manifest_path)
    backend = make_backend(model, BackendConfig(), manifest=manifest)
    try:
        classifier = Classifier(backend, manifest, manifest.artifact(model.name))
        images = np.load(ROOT / "data" / "breastmnist_28.npz")["test_images"][:20]
        for image in images:
            raw = backend.invoke(classifier.preprocess(image))
            assert classifier.scores(raw).probabilities == pytest.approx(raw.tolist(), abs=1e-6)
    finally:
        backend.close()


def test_edited_quantization_parameters_are_refused_naming_the_field(int8_model: Path, tmp_path: Path) -> None:
    model, manifest_path = _copy(int8_model, tmp_path / "m")
    raw = json.loads(manifest_path.read_text())
    output = dict(raw["artifacts"][0]["output"])
    _edit(manifest_path, model, output={**output, "scale": output["scale"] * 2})
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.output\.scale is [0-9.]+ but the model's is [0-9.]+"):
        make_backend(model, BackendConfig(), manifest=load_manifest(manifest_path))
    _edit(manifest_path, model, output=output, input={**raw["artifacts"][0]["input"], "shape": [1, 64, 64, 3]})
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.input\.shape is \[1, 64, 64, 3\] but the model's is"):
        make_backend(model, BackendConfig(), manifest=load_manifest(manifest_path))
    _edit(manifest_path, model, input=raw["artifacts"][0]["input"], output_kind="probabilities")
    with pytest.raises(ModelError, match=r"output_kind is probabilities but .* computes logits .* read logits"):
        make_backend(model, BackendConfig(), manifest=load_manifest(manifest_path))


def test_a_manifest_without_tensor_specs_still_loads_and_is_checked_on_what_it_has(
    int8_model: Path, tmp_path: Path
) -> None:
    model, manifest_path = _copy(int8_model, tmp_path / "m")
    raw = json.loads(manifest_path.read_text())
    for key in ("input", "output"):
        del raw["artifacts"][0][key]  # an older manifest may list no tensors
    manifest_path.write_text(json.dumps(raw))
    backend = make_backend(model, BackendConfig(), manifest=load_manifest(manifest_path))
    assert backend.input_spec.dtype == "int8"
    backend.close()
    raw["artifacts"][0]["target"] = "float16"
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.target is float16 but the model's tensors are int8"):
        make_backend(model, BackendConfig(), manifest=load_manifest(manifest_path))


def test_a_model_path_that_is_a_folder_says_so(
    int8_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = int8_model.parent
    for check in (lambda: verify_model(folder), lambda: make_backend(folder, BackendConfig())):
        with pytest.raises(ModelError) as info:
            check()
        assert f"{folder} is a folder (it holds {int8_model.name})" in str(info.value)
        assert "not found" not in str(info.value)
    with pytest.raises(
        ModelError, match=r"manifest path .* is a folder; pass the \.manifest\.json file itself, e\.g\."
    ):
        verify_model(int8_model, folder)
    with pytest.raises(ModelError, match=r"is a folder \(it holds no \.tflite file\)"):
        make_backend(tmp_path, BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False))
    assert main(["doctor", "--model", str(folder), "--data-dir", str(tmp_path / "d")]) == 2
    assert "is a folder (it holds" in capsys.readouterr().out


@pytest.mark.slow
def test_float32_float16_and_dynamic_models_are_told_apart_by_their_weights(
    int8_model: Path, float_model: Path, float_targets: dict[str, Path], tmp_path: Path
) -> None:
    """Their tensors in and out are all float32: a plain float32 model listed as float16 used to pass, and the
    device published ``target: float16`` for it."""
    _, module = interpreter_module()
    files = {"float32": float_model, **float_targets}
    stored = {"float32": "float32", "float16": "float16", "dynamic": "int8"}
    for kind, path in files.items():
        assert graph_weights(open_interpreter(module, path, 1)) == stored[kind]
    assert graph_weights(object()) is None  # an interpreter that lists nothing is not guessed at
    for kind, path in files.items():
        for listed in ("float16", "dynamic"):
            model, manifest_path = _copy(int8_model, tmp_path / f"{kind}-as-{listed}")
            shutil.copy(path, model)
            _edit(manifest_path, model, target=listed, output_kind="probabilities", **_float_specs(model))
            manifest = load_manifest(manifest_path)
            if kind == listed:
                make_backend(model, BackendConfig(), manifest=manifest).close()  # the truth loads
                continue
            with pytest.raises(ModelError) as info:
                make_backend(model, BackendConfig(), manifest=manifest)
            assert f"artifacts[0].target is {listed} but the model's weights are {stored[kind]}" in str(info.value)
