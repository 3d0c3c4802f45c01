"""The sizes, addresses and defaults both sides must agree on, each defined once and
derived from the choice it follows from.

Standard library only (the enclave image and the entry scripts' checks import it).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: The checkout (or the enclave image's /app): models/, sample_images/ and enclave/ live here.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = PROJECT_ROOT / "models"

# -- random values -----------------------------------------------------------------------
#: Identifiers: 128 random bits, so two never collide in practice (birthday bound 2**64).
ID_BITS = 128
REQUEST_ID_SIZE = ID_BITS // 8
SESSION_ID_SIZE = ID_BITS // 8
#: Secrets and fresh values: 256 bits, the strength of the AES-256 keys they feed.
SECRET_BITS = 256
#: The client's attestation nonce: never repeated in practice.
CLIENT_NONCE_SIZE = SECRET_BITS // 8
#: The enclave's fresh value per connection: as strong as the client's secret.
ENCLAVE_RANDOM_SIZE = SECRET_BITS // 8
SESSION_SECRET_SIZE = SECRET_BITS // 8
#: HELLO nonces the enclave accepts: at least an identifier's strength, at most twice
#: ours (another client may choose longer ones; the NSM takes up to 512 bytes).
NONCE_SIZES = range(ID_BITS // 8, 2 * CLIENT_NONCE_SIZE + 1)

# -- attestation -------------------------------------------------------------------------
#: Nitro PCRs are SHA-384 digests (the NSM reports digest "SHA384").
PCR_LENGTH = hashlib.sha384().digest_size

# -- addresses and command-line defaults -------------------------------------------------
#: vsock's VMADDR_CID_ANY: a listener on the parent accepts from any CID (not every Python
#: defines socket.VMADDR_CID_ANY).
ANY_CID = 0xFFFFFFFF
#: The parent instance's CID as an enclave sees it (the Dockerfile's CMD).
PARENT_CID = 3
#: nitro-cli run-enclave --enclave-cid in the README, and the ports of the user's commands.
DEFAULT_ENCLAVE_CID = 16
DEFAULT_ENCLAVE_PORT = 5005
DEFAULT_PARENT_PORT = 5006
#: With --transport tcp, where CIDs map to (loopback: nothing is exposed by default).
DEFAULT_TCP_HOST = "127.0.0.1"
