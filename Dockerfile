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

# The same list as nitrolesion/enclave_image.py IMAGE_PATHS (the Docker-free test copies it).
COPY enclave/ /app/enclave/
COPY nitrolesion/ /app/nitrolesion/
COPY models/lesion_classifier.tflite models/labels.json /app/models/

CMD ["python", "-u", "enclave/app.py", "3", "5005", "5006"]
