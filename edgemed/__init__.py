"""edgemed: from a trained medical-imaging CNN to triage results at the point of care.

`import edgemed` needs only the standard library. The on-device parts (capture, inference, delivery) live in
sub-modules that import their third-party dependencies (numpy, OpenCV, LiteRT, paho-mqtt) when they are used,
so a host that only converts models, or a test that only checks configuration, never pays for them.
"""

__version__ = "0.1.0"

RESULT_SCHEMA = "edgemed.result/1"
MANIFEST_SCHEMA = "edgemed.manifest/1"

__all__ = ["MANIFEST_SCHEMA", "RESULT_SCHEMA", "__version__"]
