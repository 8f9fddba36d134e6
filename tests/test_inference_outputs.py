"""Multi-output models: every backend finds the scores tensor and each feature output by name, never by position.

The model is real: a tiny CNN trained on BreastMNIST and converted to int8 by TensorFlow (in a subprocess,
``tests/multi_output_model.py``), with the class probabilities and two 8-channel pooled feature vectors as
outputs. TFLite lists them in another order than the Keras model's; the truth about which tensor holds which
Keras output comes from the flatbuffer's signature, and the values are compared with the float Keras model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from delegate_fakes import CtypesDelegate
from multi_output_model import built_model, model_input, output_rows, truth, write_manifest

import edgemed.inference.backends as backends_mod
import edgemed.inference.factory as factory_mod
from edgemed.deploy import check_deployable
from edgemed.errors import ModelError
from edgemed.inference import Backend, BackendConfig, interpreter_module, make_backend
from edgemed.inference.compiled import CompiledModelBackend
from edgemed.manifest import load_manifest


@pytest.fixture(scope="session")
def multi_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real multi-output int8 model (``tests/multi_output_model.py``); ``truth.json``/``truth.npz`` beside it."""
    return built_model(tmp_path_factory.mktemp("multi"))


def _assert_matches_keras(backend: Backend, model: Path) -> None:
    names, images, floats = truth(model)
    rows = output_rows(backend, images)
    for key, tensor in names.items():
        spec = next(s for s in backend.output_specs if s.name == tensor)
        got, want = rows[tensor], floats[key]
        assert got.shape == want.shape, key
        # int8 rounding of the activations along the way: a few quantization steps, far less than the spread
        # between the two same-sized feature vectors (checked below), so a swapped output cannot pass.
        assert np.abs(got - want).max() <= 3 * spec.scale, key
    assert np.abs(floats["pool_a"] - floats["pool_b"]).max() > 30 * max(s.scale for s in backend.output_specs)


def test_interpreter_lists_outputs_in_another_order_than_keras(multi_model: Path) -> None:
    # The premise of this file: position cannot be trusted. If a TensorFlow release stops reordering, the
    # tests below still hold, but this one says the fixture no longer exercises the reorder.
    names, _, _ = truth(multi_model)
    backend = make_backend(multi_model, BackendConfig())
    order = [spec.name for spec in backend.output_specs]
    assert sorted(order) == sorted(names.values())
    assert order != [names[key] for key in ("probs", "pool_a", "pool_b")]
    assert backend.output_spec == backend.output_specs[0]  # no scores_output: the first, as before this issue


def test_scores_output_chooses_the_scores_tensor_and_its_output_kind(multi_model: Path) -> None:
    names, _, _ = truth(multi_model)
    first = make_backend(multi_model, BackendConfig())
    scores = make_backend(multi_model, BackendConfig(), scores_output=names["probs"])
    assert scores.output_spec.name == names["probs"] and scores.output_spec.shape == (1, 2)
    assert scores.output_specs == first.output_specs
    # output_kind is read from the op that computes the scores tensor (SOFTMAX), not from the first output.
    assert scores.output_kind == "probabilities"
    if first.output_spec.name != names["probs"]:
        assert first.output_kind == "logits"  # a pooled feature vector comes from MEAN
    _assert_matches_keras(scores, multi_model)


def test_unknown_names_are_model_errors_naming_the_outputs(multi_model: Path) -> None:
    names, images, _ = truth(multi_model)
    with pytest.raises(ModelError, match=r"'pool_z' as the model's scores output.*StatefulPartitionedCall"):
        make_backend(multi_model, BackendConfig(), scores_output="pool_z")
    backend = make_backend(multi_model, BackendConfig(), scores_output=names["probs"])
    with pytest.raises(ModelError, match="after invoke"):
        backend.output(names["pool_a"])
    backend.invoke(model_input(images[0], backend))
    with pytest.raises(ModelError, match=r"no output named 'pool_z'; its outputs are 'Stateful.*output_specs"):
        backend.output("pool_z")
    backend.close()
    with pytest.raises(ModelError, match="closed"):
        backend.output(names["pool_a"])


def test_compiled_model_backend_gives_the_interpreters_outputs_by_name(multi_model: Path) -> None:
    # The GPU path minus the GPU: CompiledModel on its CPU accelerator, bit-identical to the interpreter.
    names, images, _ = truth(multi_model)
    _, module = interpreter_module()
    compiled = CompiledModelBackend(module, multi_model, 1, accelerator="cpu", scores_output=names["probs"])
    plain = make_backend(multi_model, BackendConfig(), scores_output=names["probs"])
    assert compiled.output_specs == plain.output_specs and compiled.output_spec == plain.output_spec
    assert compiled.output_kind == "probabilities"
    got, want = output_rows(compiled, images), output_rows(plain, images)
    assert all(np.array_equal(got[name], want[name]) for name in want)
    compiled.close()
    with pytest.raises(ModelError, match="closed"):
        compiled.output(names["pool_a"])


class _ReversedBuffers:
    """A real CompiledModel whose output buffers come in the reverse order (as a LiteRT release may keep them)."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._n = len(real.create_output_buffers(0))

    def create_output_buffers(self, signature: int) -> list[Any]:
        return list(reversed(self._real.create_output_buffers(signature)))

    def get_output_buffer_requirements(self, k: int, signature: int = 0) -> dict[str, Any]:
        return dict(self._real.get_output_buffer_requirements(self._n - 1 - k, signature))

    def run_by_index(self, signature: int, inputs: list[Any], outputs: list[Any]) -> None:
        self._real.run_by_index(signature, inputs, list(reversed(outputs)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_compiled_model_buffer_order_is_verified_not_assumed(
    multi_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_edge_litert import compiled_model

    names, images, _ = truth(multi_model)
    real_from_file = compiled_model.CompiledModel.from_file
    monkeypatch.setattr(
        compiled_model.CompiledModel,
        "from_file",
        staticmethod(lambda *a, **k: _ReversedBuffers(real_from_file(*a, **k))),
    )
    _, module = interpreter_module()
    compiled = CompiledModelBackend(module, multi_model, 1, accelerator="cpu", scores_output=names["probs"])
    # The two 8-value feature outputs share a size: only the probe run tells their buffers apart.
    assert compiled.invoke(model_input(images[0], compiled)).shape == (2,)
    plain = make_backend(multi_model, BackendConfig(), scores_output=names["probs"])
    got, want = output_rows(compiled, images), output_rows(plain, images)
    assert all(np.array_equal(got[name], want[name]) for name in want)


@pytest.fixture()
def edgetpu_copy(multi_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the multi-output model treated as Edge TPU-compiled (no edgetpu_compiler exists here)."""
    copy = tmp_path / "multi_edgetpu.tflite"
    copy.write_bytes(multi_model.read_bytes())
    monkeypatch.setattr(backends_mod, "is_edgetpu_compiled", lambda model: Path(model) == copy)
    return copy


def test_edgetpu_delegate_path_reads_outputs_by_name(
    multi_model: Path, edgetpu_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real native delegate (claiming no nodes) at the load_delegate seam: the Edge TPU backend's own code path.
    monkeypatch.setattr(factory_mod, "load_external_delegate", lambda *a, **k: CtypesDelegate())
    names, _, _ = truth(multi_model)
    cfg = BackendConfig(accelerator="edgetpu", allow_cpu_fallback=False)
    backend = make_backend(edgetpu_copy, cfg, scores_output=names["probs"])
    assert (backend.delegate, backend.degraded) == ("edgetpu", False)
    assert backend.output_spec.name == names["probs"]
    _assert_matches_keras(backend, multi_model)


def test_edgetpu_fallback_to_the_cpu_twin_keeps_the_scores_output(multi_model: Path, edgetpu_copy: Path) -> None:
    # libedgetpu is really absent here: the twin runs on the CPU, with the same output names.
    names, _, _ = truth(multi_model)
    backend = make_backend(
        edgetpu_copy, BackendConfig(accelerator="edgetpu"), fallback_model=multi_model, scores_output=names["probs"]
    )
    assert (backend.delegate, backend.degraded) == ("cpu", True)
    assert backend.output_spec.name == names["probs"] and backend.output_kind == "probabilities"
    _assert_matches_keras(backend, multi_model)


def test_deployable_opens_the_artifacts_scores_output(multi_model: Path, tmp_path: Path) -> None:
    names, _, _ = truth(multi_model)
    manifest_path = write_manifest(multi_model, tmp_path, make_backend(multi_model, BackendConfig()))
    model = check_deployable(tmp_path / multi_model.name, manifest_path, load=True)
    backend = model.open_backend(BackendConfig())
    assert backend.output_spec.name == names["probs"] != backend.output_specs[0].name
    _assert_matches_keras(backend, multi_model)


def _edited(manifest_path: Path, change: Any) -> None:
    raw = json.loads(manifest_path.read_text())
    change(raw["artifacts"][0])
    manifest_path.write_text(json.dumps(raw))
    load_manifest(manifest_path)  # still a valid manifest: only the device's load check can catch it


def test_a_listed_output_the_model_lacks_is_refused_at_load(multi_model: Path, tmp_path: Path) -> None:
    manifest_path = write_manifest(multi_model, tmp_path, make_backend(multi_model, BackendConfig()))
    feature = next(
        j
        for j, o in enumerate(json.loads(manifest_path.read_text())["artifacts"][0]["outputs"])
        if o["role"] != "scores"
    )
    _edited(manifest_path, lambda art: art["outputs"][feature].update(name="renamed:0"))
    model = check_deployable(tmp_path / multi_model.name, manifest_path)
    with pytest.raises(ModelError, match=rf"artifacts\[0\]\.outputs\[{feature}\] names 'renamed:0'.*convert again"):
        model.open_backend(BackendConfig())
    with pytest.raises(ModelError, match=rf"artifacts\[0\]\.outputs\[{feature}\]"):
        check_deployable(tmp_path / multi_model.name, manifest_path, load=True)  # edgemed bundle's check


def test_a_listed_output_with_other_quantization_is_refused_at_load(multi_model: Path, tmp_path: Path) -> None:
    manifest_path = write_manifest(multi_model, tmp_path, make_backend(multi_model, BackendConfig()))
    _edited(
        manifest_path, lambda art: [o.update(scale=o["scale"] * 2) for o in art["outputs"] if o["role"] != "scores"]
    )
    with pytest.raises(ModelError, match=r"artifacts\[0\]\.outputs\[\d\]\.scale is"):
        check_deployable(tmp_path / multi_model.name, manifest_path).open_backend(BackendConfig())


def test_a_scores_output_the_model_lacks_is_refused_at_load(multi_model: Path, tmp_path: Path) -> None:
    manifest_path = write_manifest(multi_model, tmp_path, make_backend(multi_model, BackendConfig()))

    def rename_scores(art: dict[str, Any]) -> None:
        for o in art["outputs"]:
            if o["role"] == "scores":
                o["name"] = "probs:0"

    _edited(manifest_path, rename_scores)
    with pytest.raises(ModelError, match=r"names 'probs:0' as the model's scores output.*convert again"):
        check_deployable(tmp_path / multi_model.name, manifest_path).open_backend(BackendConfig())
