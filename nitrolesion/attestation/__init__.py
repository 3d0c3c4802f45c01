"""AWS Nitro Enclaves attestation: produce documents in the enclave, verify them in the parent.

Who owns what:

- ``verifier``       verify_attestation(document, now=, policy=, ...) -> AttestationResult;
                     check_public_key(result, key) (the numbered checks are in its docstring)
- ``policy``         AttestationPolicy: allowed PCR sets, debug mode, maximum age (JSON format)
- ``trust``          the pinned AWS Nitro Enclaves Root-G1 (roots/aws_nitro_root_g1.pem)
- ``cose``           COSE_Sign1 encode/decode and Sig_structure (RFC 8152)
- ``nsm``            the /dev/nsm ioctl client and its pure CBOR request/response codec
- ``dev_authority``  local development PKI issuing Nitro-format documents (never trusted by default)
- ``provider``       open_attestation_provider(): NSM, else dev authority if asked, else refuse
- ``cli``            ``parent.py verify-attestation``
- ``errors``         AttestationError and one subclass per check
"""
