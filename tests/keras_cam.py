"""The float Keras side of the CAM tests, run in a subprocess so TensorFlow never loads into the test process.

``python tests/keras_cam.py MODEL.keras LAYER IN.npz OUT.npz``: for the uint8 images ``images`` (N, H, W, C) and
the classes ``classes`` (N,) in IN.npz, writes to OUT.npz ``maps`` (N, H', W'): the Keras model's activations of
LAYER (the GAP's input) weighed by the final Dense kernel's column of each image's class, ``sum_c w[c][k] F[i,j,c]``
(Zhou et al., 2016), computed independently of the converter's code; ``kernel`` (channels, classes); and ``probs``
(N, K) the model's own outputs.
"""

from __future__ import annotations

import sys

import numpy as np


def main(model_path: str, layer: str, inputs: str, out: str) -> None:
    import keras

    model = keras.models.load_model(model_path, compile=False)
    dense = model.layers[-1]
    kernel = np.asarray(dense.get_weights()[0], dtype=np.float64)
    data = np.load(inputs)
    x = data["images"].astype(np.float32) / np.float32(255.0)
    if x.ndim == 3:
        x = x[..., None]
    features = keras.Model(model.inputs, model.get_layer(layer).output).predict(x, verbose=0)
    columns = kernel[:, data["classes"]].T  # (N, channels)
    maps = np.einsum("nhwc,nc->nhw", np.asarray(features, dtype=np.float64), columns)
    probs = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    np.savez(out, maps=maps, kernel=kernel, probs=probs)


if __name__ == "__main__":
    main(*sys.argv[1:5])
