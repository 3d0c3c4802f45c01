# The enclave image: only the enclave's runtime, code, the shared package and the model.
# No keys and no rngd at build time: the enclave makes its key pair in memory at boot.
FROM python:3.11-slim

# PYTHONPATH: the package is imported from the copied tree (nothing of it is pip-installed).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=/app
WORKDIR /app

# Exact pins, no dependency resolution at build time: the same requirements give the same
# image and therefore the same PCR0..2 measurements for the attestation policy.
COPY enclave/requirements.txt /app/enclave/requirements.txt
RUN pip install --no-cache-dir --no-deps -r /app/enclave/requirements.txt

# Exactly nitrolesion/enclave_image.py IMAGE_PATHS (tests/test_enclave_image.py checks it):
# only what the enclave runs; no parent CLI, verifier, keystore, training or dev authority.
COPY enclave/__init__.py enclave/app.py /app/enclave/
COPY nitrolesion/__init__.py nitrolesion/environment.py nitrolesion/errors.py nitrolesion/limits.py nitrolesion/memory_budget.py nitrolesion/protocol.py nitrolesion/transport.py /app/nitrolesion/
COPY nitrolesion/attestation/__init__.py nitrolesion/attestation/errors.py nitrolesion/attestation/nsm.py nitrolesion/attestation/provider.py /app/nitrolesion/attestation/
COPY nitrolesion/crypto/__init__.py nitrolesion/crypto/envelope.py nitrolesion/crypto/keywrap.py nitrolesion/crypto/result_signature.py nitrolesion/crypto/session.py /app/nitrolesion/crypto/
COPY nitrolesion/enclave/__init__.py nitrolesion/enclave/app.py nitrolesion/enclave/connection.py nitrolesion/enclave/parent_link.py nitrolesion/enclave/service.py nitrolesion/enclave/worker_pool.py /app/nitrolesion/enclave/
COPY nitrolesion/model/__init__.py nitrolesion/model/classifier.py nitrolesion/model/labels.py nitrolesion/model/preprocess.py nitrolesion/model/triage.py /app/nitrolesion/model/
COPY nitrolesion/wire/__init__.py nitrolesion/wire/frames.py nitrolesion/wire/messages.py /app/nitrolesion/wire/
COPY models/lesion_classifier.tflite models/labels.json models/lesion_classifier.triage.npz /app/models/

CMD ["python", "-u", "enclave/app.py", "3", "5005", "5006"]
