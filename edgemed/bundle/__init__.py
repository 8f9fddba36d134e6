"""``edgemed bundle``: one checked, self-describing archive a field engineer copies onto a device.

A bundle holds what a device needs besides the edgemed package: the device profile (rewritten so that its model
path points inside the bundle), the model with its manifest (and the CPU int8 twin of an Edge TPU model), the
broker's CA certificate when the profile names one that exists here, a systemd unit, an install script, a
``BUNDLE.json`` that says what is inside, and ``SHA256SUMS``. Optionally the wheels to install offline.

Nothing secret and nothing about patients goes in: passwords, client keys and certificates are provisioned on
each device separately (the install notes list where the profile expects them), and no image is ever bundled.

The bundle is checked before it is written: the profile validates, the model matches its manifest and was not
rejected by the acceptance gate, the triage policy names only the model's labels, and the profile, read back
from the staged bundle, finds its model there.

Modules:
    build.py           :func:`build_bundle`, in named steps
    device_profile.py  the profile rewritten for the device (model inside the bundle, CA, secrets to provision)
    verify.py          :func:`verify_bundle` (the device's own check; the model by ``edgemed.deploy``)
    tree.py            plain files only: :func:`extract_bundle`, :func:`refuse_unsafe_entries`
    render.py          fills in ``templates/install.sh.in`` and ``templates/edgemed.service.in`` (package data)
"""

from __future__ import annotations

from edgemed.bundle.build import BundleResult, build_bundle
from edgemed.bundle.tree import extract_bundle, refuse_unsafe_entries
from edgemed.bundle.verify import DEFAULT_TRUSTED_KEY, verify_bundle
from edgemed.deploy import check_models_load

__all__ = [
    "DEFAULT_TRUSTED_KEY",
    "BundleResult",
    "build_bundle",
    "check_models_load",
    "extract_bundle",
    "refuse_unsafe_entries",
    "verify_bundle",
]
