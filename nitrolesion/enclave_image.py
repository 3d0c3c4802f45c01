"""What the enclave image holds: the Dockerfile's COPY list, in one place.

Only what the enclave runs: the entry script, the enclave application and service, the
protocol with its wire and crypto modules, the NSM client, the preprocessing and classifier,
the model with its labels and triage file. Nothing the parent, the verifier or the training uses (CLI,
keystore, policy, verifier, metrics, dataset split, prediction files), so editing them
leaves PCR0 and every user's policy unchanged.

The development attestation authority (``--dev-attestation``, off Nitro) is not in the
production image: ``DEV_ATTESTATION_PATHS`` are what it needs on top, imported only with
that flag. It measures ``image_files()`` (image and development files) into its PCR0, and
the Docker-free image test runs exactly those files, so the test sees the tree it measures.
"""

from __future__ import annotations

from pathlib import Path

from nitrolesion.limits import PROJECT_ROOT

#: Paths relative to the project root, as the Dockerfile copies them.
IMAGE_PATHS = (
    "enclave/__init__.py",
    "enclave/app.py",
    "nitrolesion/__init__.py",
    "nitrolesion/environment.py",
    "nitrolesion/errors.py",
    "nitrolesion/limits.py",
    "nitrolesion/memory_budget.py",
    "nitrolesion/protocol.py",
    "nitrolesion/transport.py",
    "nitrolesion/attestation/__init__.py",
    "nitrolesion/attestation/errors.py",
    "nitrolesion/attestation/nsm.py",
    "nitrolesion/attestation/provider.py",
    "nitrolesion/crypto/__init__.py",
    "nitrolesion/crypto/envelope.py",
    "nitrolesion/crypto/keywrap.py",
    "nitrolesion/crypto/result_signature.py",
    "nitrolesion/crypto/session.py",
    "nitrolesion/enclave/__init__.py",
    "nitrolesion/enclave/app.py",
    "nitrolesion/enclave/connection.py",
    "nitrolesion/enclave/parent_link.py",
    "nitrolesion/enclave/service.py",
    "nitrolesion/enclave/worker_pool.py",
    "nitrolesion/model/__init__.py",
    "nitrolesion/model/classifier.py",
    "nitrolesion/model/labels.py",
    "nitrolesion/model/preprocess.py",
    "nitrolesion/model/triage.py",
    "nitrolesion/wire/__init__.py",
    "nitrolesion/wire/frames.py",
    "nitrolesion/wire/messages.py",
    "models/lesion_classifier.tflite",
    "models/labels.json",
    "models/lesion_classifier.triage.npz",
)

#: What ``--dev-attestation`` needs beyond the image: the development authority (with its
#: COSE signing), the policy it writes for the parent, the private-file writer, this list.
DEV_ATTESTATION_PATHS = (
    "nitrolesion/attestation/cose.py",
    "nitrolesion/attestation/dev_authority.py",
    "nitrolesion/attestation/policy.py",
    "nitrolesion/crypto/keystore.py",
    "nitrolesion/enclave_image.py",
)


def image_files(root: Path = PROJECT_ROOT) -> list[Path]:
    """The files the development authority measures under ``root``: the image's and the
    development ones, sorted (the same list in a checkout and in the test's copy)."""
    return sorted(root / relative for relative in IMAGE_PATHS + DEV_ATTESTATION_PATHS)
