// The client's session keys and cipher in WebCrypto, exactly as nitrolesion/crypto/session.py
// and keywrap.py compute them (docs/HANDSHAKE.md):
//   T   = SHA-256(L_T | type | len(8) | body | ...)        over HELLO, ATTESTATION, SESSION_OPEN
//   PRK = HKDF-Extract(salt = len(nonce_c) | nonce_c | r_E, IKM = secret)
//   OKM = HKDF-Expand(PRK, L_K | session_id | T2, 96) = K_ce | K_ec | K_cf
//   wrapped secret = RSA-OAEP-SHA256(pk_E, secret, label = L_W | session_id)
//   confirmation   = HMAC-SHA256(K_cf, L_C | T2)
//   message        = AES-256-GCM(K, nonce = dir | 000 | n, aad = L_S | session_id | dir | type | n)
import { concat, equal, randomBytes, sha256, u64, utf8 } from "./bytes.js";

const L_T = utf8("nitrolesion-transcript/2");
const L_W = utf8("nitrolesion-session-secret/2");
const L_K = utf8("nitrolesion-session-keys/2");
const L_C = utf8("nitrolesion-enclave-confirms/2");
const L_S = utf8("nitrolesion-session/2");
const CLIENT_TO_ENCLAVE = 0x01;
const ENCLAVE_TO_CLIENT = 0x02;
export const SECRET_SIZE = 32;
export const SESSION_ID_SIZE = 16;
export const MIN_RSA_BITS = 3072;

export class CryptoError extends Error {
  get check() { return "CryptoError"; }
}

/** A running transcript: the frames as sent, each as type | length | body. */
export class Transcript {
  constructor() { this.parts = [L_T]; }
  add(type, body) { this.parts.push(new Uint8Array([type]), u64(body.length), body); }
  digest() { return sha256(concat(...this.parts)); }
}

/** SESSION_OPEN's wrapped secret and the keys it leads to, for the attested key. */
export async function openSession(enclaveKeyDer, nonce, enclaveRandom) {
  const key = await crypto.subtle.importKey(
    "spki", enclaveKeyDer, { name: "RSA-OAEP", hash: "SHA-256" }, false, ["encrypt"]);
  if (key.algorithm.modulusLength < MIN_RSA_BITS)
    throw new CryptoError(`the attested key is RSA-${key.algorithm.modulusLength}; at least RSA-${MIN_RSA_BITS} is required`);
  const secret = randomBytes(SECRET_SIZE);
  const sessionId = randomBytes(SESSION_ID_SIZE);
  const wrapped = new Uint8Array(await crypto.subtle.encrypt(
    { name: "RSA-OAEP", label: concat(L_W, sessionId) }, key, secret));
  return { secret, sessionId, wrapped };
}

export async function deriveKeys(secret, nonce, enclaveRandom, sessionId, transcript) {
  const ikm = await crypto.subtle.importKey("raw", secret, "HKDF", false, ["deriveBits"]);
  const okm = new Uint8Array(await crypto.subtle.deriveBits({
    name: "HKDF", hash: "SHA-256",
    salt: concat(new Uint8Array([nonce.length]), nonce, enclaveRandom),
    info: concat(L_K, sessionId, transcript),
  }, ikm, 96 * 8));
  const aes = (raw) => crypto.subtle.importKey("raw", raw, "AES-GCM", false, ["encrypt", "decrypt"]);
  return {
    clientToEnclave: await aes(okm.subarray(0, 32)),
    enclaveToClient: await aes(okm.subarray(32, 64)),
    confirmation: await crypto.subtle.importKey(
      "raw", okm.subarray(64, 96), { name: "HMAC", hash: "SHA-256" }, false, ["sign"]),
  };
}

/** Raises CryptoError unless ``confirmation`` is the enclave's proof for these keys. */
export async function checkConfirmation(keys, transcript, confirmation) {
  const expected = new Uint8Array(await crypto.subtle.sign("HMAC", keys.confirmation, concat(L_C, transcript)));
  if (!equal(expected, confirmation))
    throw new CryptoError("the enclave's key confirmation is wrong: it did not derive this session's keys");
}

/** Both directions of one session; counters from 0, the receiver takes only the next one. */
export class SessionCipher {
  constructor(keys, sessionId) {
    this.keys = keys;
    this.sessionId = sessionId;
    this.sendCounter = 0;
    this.receiveCounter = 0;
  }

  params(direction, type, counter) {
    return {
      name: "AES-GCM", tagLength: 128,
      iv: concat(new Uint8Array([direction, 0, 0, 0]), u64(counter)),
      additionalData: concat(L_S, this.sessionId, new Uint8Array([direction, type]), u64(counter)),
    };
  }

  async seal(type, plaintext) {
    const counter = this.sendCounter++;
    const sealed = await crypto.subtle.encrypt(
      this.params(CLIENT_TO_ENCLAVE, type, counter), this.keys.clientToEnclave, plaintext);
    return { counter, ciphertext: new Uint8Array(sealed) };
  }

  async open(type, counter, ciphertext) {
    if (counter !== this.receiveCounter)
      throw new CryptoError(`session message out of order: expected counter ${this.receiveCounter}, got ${counter}`);
    let plain;
    try {
      plain = await crypto.subtle.decrypt(
        this.params(ENCLAVE_TO_CLIENT, type, counter), this.keys.enclaveToClient, ciphertext);
    } catch (e) {
      throw new CryptoError("session message did not authenticate (tampered, or wrong session/type)");
    }
    this.receiveCounter++;
    return new Uint8Array(plain);
  }
}
