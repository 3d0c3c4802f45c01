// Verify an AWS Nitro Enclaves attestation document in the browser, in the order and with
// the check names of nitrolesion/attestation/verifier.py (a failure's ``check`` is the
// Python error class name: UntrustedRoot, PcrMismatch, NonceMismatch, ...).
// CBOR by cbor2, X.509 by @peculiar/x509, every signature by WebCrypto.
// @peculiar/x509 resolves its parsers through tsyringe, which needs this polyfill first.
import "reflect-metadata";
import { encode, Tag } from "cbor2";
import { BasicConstraintsExtension, KeyUsageFlags, KeyUsagesExtension, X509Certificate } from "@peculiar/x509";
import { equal, fromHex, hex, sha256 } from "./bytes.js";
import { decodeStrict } from "./frames.js";

/** SHA-256 of the AWS Nitro Enclaves Root-G1 certificate (DER), as pinned in
 * nitrolesion/attestation/trust.py and published by AWS. */
export const AWS_NITRO_ROOT_G1_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b";
const ALG_ES384 = -35;
const PCR_LENGTH = 48;
const MAX_OPTIONAL_FIELD = 1024;
const MAX_CABUNDLE = 16;
const DEBUG_PCRS = [0, 1, 2];
const MAX_CLOCK_SKEW_MS = 5 * 60 * 1000;
/** Without a max_age in the policy the page still bounds the age (the CLI's default). */
export const DEFAULT_MAX_AGE_SECONDS = 300;
// Extensions a CA or leaf here may mark critical; any other critical one is refused.
const KNOWN_CRITICAL = new Set(["2.5.29.19", "2.5.29.15", "2.5.29.37", "2.5.29.32", "2.5.29.17"]);

export class AttestationError extends Error {
  constructor(check, message) {
    super(message);
    this.check = check;
  }
}
const fail = (check, message) => { throw new AttestationError(check, message); };
const isBytes = (v) => v instanceof Uint8Array;

// Step 1
function decodeCose(document) {
  let item;
  try {
    item = decodeStrict(document);
  } catch (e) {
    fail("CoseDecodeError", `COSE_Sign1: expected well-formed CBOR (${e.message})`);
  }
  if (item instanceof Tag) {
    if (Number(item.tag) !== 18) fail("CoseDecodeError", `expected CBOR tag 18 (COSE_Sign1), got tag ${item.tag}`);
    item = item.contents;
  }
  if (!Array.isArray(item) || item.length !== 4) fail("CoseDecodeError", "expected a 4-element array");
  const [protectedHeader, , payload, signature] = item;
  if (!isBytes(protectedHeader) || !isBytes(payload) || !isBytes(signature))
    fail("CoseDecodeError", "expected byte strings for protected header, payload and signature");
  return { protectedHeader, payload, signature };
}

// Step 2
function checkAlgorithm(protectedHeader) {
  let header;
  try {
    header = protectedHeader.length ? decodeStrict(protectedHeader) : new Map();
  } catch (e) {
    fail("CoseDecodeError", "protected header: expected a CBOR map");
  }
  const get = (k) => (header instanceof Map ? header.get(k) : undefined);
  if (get(1) !== ALG_ES384) fail("UnsupportedAlgorithm", `protected header alg: expected ${ALG_ES384} (ES384)`);
  if (header.has(2)) fail("UnsupportedAlgorithm", "protected header crit: expected none");
}

// Step 3
function parsePayload(payload) {
  let doc;
  try {
    doc = decodeStrict(payload);
  } catch (e) {
    fail("MalformedDocument", `payload: expected well-formed CBOR (${e.message})`);
  }
  if (doc === null || typeof doc !== "object" || Array.isArray(doc) || doc instanceof Map)
    fail("MalformedDocument", "payload: expected a CBOR map with text keys");
  const need = (key, ok, what) => {
    if (!(key in doc) || !ok(doc[key])) fail("MalformedDocument", `${key}: expected ${what}`);
    return doc[key];
  };
  const optional = (key, min) => {
    const v = doc[key];
    if (v === undefined || v === null) return null;
    if (!isBytes(v) || v.length < min || v.length > MAX_OPTIONAL_FIELD)
      fail("MalformedDocument", `${key}: expected null or ${min}..${MAX_OPTIONAL_FIELD} bytes`);
    return v;
  };
  const moduleId = need("module_id", (v) => typeof v === "string" && v.length >= 1 && v.length <= 256, "text");
  need("digest", (v) => v === "SHA384", '"SHA384"');
  const timestamp = Number(need("timestamp", (v) => (typeof v === "number" && Number.isInteger(v) && v > 0)
    || typeof v === "bigint", "milliseconds"));
  const rawPcrs = need("pcrs", (v) => v instanceof Map && v.size >= 1 && v.size <= 32, "a map of PCRs");
  const pcrs = new Map();
  for (const [index, value] of rawPcrs) {
    const i = Number(index);
    if (!Number.isInteger(i) || i < 0 || i > 31) fail("MalformedDocument", "pcrs: expected index 0..31");
    if (!isBytes(value) || value.length !== PCR_LENGTH) fail("MalformedDocument", `pcrs[${i}]: expected ${PCR_LENGTH} bytes (SHA-384)`);
    pcrs.set(i, value);
  }
  for (const i of DEBUG_PCRS) if (!pcrs.has(i)) fail("MalformedDocument", "pcrs: expected PCR0, PCR1 and PCR2");
  const certificate = need("certificate", (v) => isBytes(v) && v.length >= 1 && v.length <= 1024, "DER bytes");
  const cabundle = need("cabundle", (v) => Array.isArray(v) && v.length >= 1 && v.length <= MAX_CABUNDLE
    && v.every((c) => isBytes(c) && c.length >= 1 && c.length <= 1024), "a list of DER certificates");
  return {
    moduleId, timestamp, pcrs, certificate, cabundle,
    publicKey: optional("public_key", 1), userData: optional("user_data", 0), nonce: optional("nonce", 0),
  };
}

function parseCertificate(der, name) {
  try {
    return new X509Certificate(der);
  } catch (e) {
    return fail("CertificateChainError", `${name}: expected a DER X.509 certificate, got unparsable bytes`);
  }
}

function extensionsOf(cert, name) {
  for (const ext of cert.extensions) {
    if (ext.critical && !KNOWN_CRITICAL.has(ext.type))
      fail("CertificateChainError", `${name}: unknown critical extension ${ext.type}`);
  }
  return {
    basic: cert.getExtension(BasicConstraintsExtension),
    usage: cert.getExtension(KeyUsagesExtension),
  };
}

// Step 4: chain certificate <- cabundle[-1] <- ... <- cabundle[0], cabundle[0] a trusted root.
async function verifyChain(leafDer, bundleDers, now, trustedRoots) {
  const anchor = hex(await sha256(bundleDers[0]));
  if (!trustedRoots.has(anchor))
    fail("UntrustedRoot", `cabundle[0]: expected a trusted root (${[...trustedRoots.keys()].map((f) => "sha256:" + f).join(", ")}), got sha256:${anchor}`);
  const chain = [["certificate", parseCertificate(leafDer, "certificate")]];
  for (let n = bundleDers.length - 1; n >= 0; n--) chain.push([`cabundle[${n}]`, parseCertificate(bundleDers[n], `cabundle[${n}]`)]);
  for (const [name, cert] of chain) {
    if (now > cert.notAfter.getTime()) fail("CertificateExpired", `${name}: expected valid at ${new Date(now).toISOString()}, got notAfter ${cert.notAfter.toISOString()}`);
    if (now < cert.notBefore.getTime()) fail("CertificateNotYetValid", `${name}: expected valid at ${new Date(now).toISOString()}, got notBefore ${cert.notBefore.toISOString()}`);
  }
  for (let depth = 0; depth < chain.length; depth++) {
    const [name, cert] = chain[depth];
    const [, issuer] = chain[Math.min(depth + 1, chain.length - 1)]; // the root signs itself
    if (cert.issuer !== issuer.subject) fail("CertificateChainError", `${name}: expected issuer ${issuer.subject}, got ${cert.issuer}`);
    if (!(await cert.verify({ publicKey: issuer.publicKey, signatureOnly: true })))
      fail("CertificateChainError", `${name}: expected a valid signature by its issuer, got an invalid one`);
    const { basic, usage } = extensionsOf(cert, name);
    if (depth === 0) {
      if (!basic || basic.ca) fail("CertificateChainError", `${name}: expected basicConstraints cA false on the leaf`);
      if (!usage || !(usage.usages & KeyUsageFlags.digitalSignature))
        fail("CertificateChainError", `${name}: expected keyUsage digitalSignature on the leaf`);
    } else {
      if (!basic || !basic.ca) fail("CertificateChainError", `${name}: expected a CA certificate (basicConstraints cA true)`);
      if (basic.pathLength !== undefined && basic.pathLength < depth - 1)
        fail("CertificateChainError", `${name}: path length constraint ${basic.pathLength} exceeded`);
      if (!usage || !(usage.usages & KeyUsageFlags.keyCertSign))
        fail("CertificateChainError", `${name}: expected keyUsage keyCertSign on a CA`);
    }
  }
  return { leaf: chain[0][1], rootIsAws: anchor === AWS_NITRO_ROOT_G1_SHA256 };
}

// Step 5
async function verifySignature(leaf, cose) {
  let key;
  try {
    key = await crypto.subtle.importKey("spki", leaf.publicKey.rawData,
      { name: "ECDSA", namedCurve: "P-384" }, false, ["verify"]);
  } catch (e) {
    fail("UnsupportedAlgorithm", "certificate: expected an EC P-384 key for ES384");
  }
  if (cose.signature.length !== 96) fail("SignatureInvalid", `expected a 96-byte r||s signature, got ${cose.signature.length} bytes`);
  const signed = encode(["Signature1", cose.protectedHeader, new Uint8Array(0), cose.payload]);
  if (!(await crypto.subtle.verify({ name: "ECDSA", hash: "SHA-384" }, key, cose.signature, signed)))
    fail("SignatureInvalid", "expected a signature by the leaf key over the COSE Sig_structure, got an invalid one");
}

/** Index of the first allowed PCR set the document satisfies, -1 if PCRs are not checked. */
function matchPcrs(policy, pcrs) {
  if (policy.any_pcrs) return -1;
  const sets = policy.allowed_pcrs || [];
  for (let n = 0; n < sets.length; n++) {
    if (Object.entries(sets[n]).every(([key, value]) => {
      const got = pcrs.get(Number(key.slice(3)));
      return got !== undefined && equal(got, fromHex(value));
    })) return n;
  }
  const first = sets.length ? Object.entries(sets[0]).find(([k, v]) => !equal(pcrs.get(Number(k.slice(3))) || new Uint8Array(), fromHex(v))) : null;
  return fail("PcrMismatch", first ? `set #0: expected ${first[0]} ${first[1]}, got ${hex(pcrs.get(Number(first[0].slice(3))) || new Uint8Array())}`
    : "expected PCRs matching an allowed set, got a policy that allows no PCRs");
}

/**
 * Verify ``document`` (steps 1-6) and that ``offeredKey`` is the attested key (step 7).
 * ``trustedRoots``: Map of SHA-256 hex -> label. ``policy``: the served policy's JSON form.
 * Returns the verified facts; throws AttestationError with the failed check's name.
 */
export async function verifyAttestation(document, { now, policy, nonce, trustedRoots, offeredKey }) {
  const cose = decodeCose(document);
  checkAlgorithm(cose.protectedHeader);
  const doc = parsePayload(cose.payload);
  const { leaf, rootIsAws } = await verifyChain(doc.certificate, doc.cabundle, now, trustedRoots);
  await verifySignature(leaf, cose);
  const debug = DEBUG_PCRS.some((i) => doc.pcrs.get(i).every((b) => b === 0));
  if (debug && !policy.allow_debug) fail("DebugModeRejected", "expected a production enclave (non-zero PCR0/1/2), got all-zero PCRs (debug mode)");
  const matched = matchPcrs(policy, doc.pcrs);
  if (!doc.nonce || !equal(doc.nonce, nonce)) fail("NonceMismatch", `expected nonce ${hex(nonce).slice(0, 32)}..., got ${doc.nonce ? hex(doc.nonce).slice(0, 32) + "..." : "no nonce"}`);
  const maxAgeMs = 1000 * (policy.max_age_seconds ?? DEFAULT_MAX_AGE_SECONDS);
  if (now - doc.timestamp > maxAgeMs) fail("DocumentTooOld", `expected age at most ${maxAgeMs / 1000} s, got ${(now - doc.timestamp) / 1000} s`);
  if (doc.timestamp - now > MAX_CLOCK_SKEW_MS) fail("DocumentFromFuture", `timestamp ${new Date(doc.timestamp).toISOString()} is more than 5 minutes ahead`);
  if (!doc.publicKey || !equal(doc.publicKey, offeredKey))
    fail("PublicKeyMismatch", "the key offered beside the document is not the attested key; refusing to send");
  if (!doc.userData || doc.userData.length !== 32)
    fail("ProtocolError", "the attestation carries no 32-byte enclave random value in user_data: the enclave speaks an older protocol");
  return { ...doc, debug, rootIsAws, matchedPcrSet: matched };
}
