// One connection to the enclave through the parent's blind relay (a WebSocket: one binary
// message = one frame), and the client's side of the flow of nitrolesion/protocol.py:
// HELLO -> ATTESTATION (verified here) -> SESSION_OPEN -> SESSION_READY -> SESSION_CLASSIFY*.
import { encode } from "cbor2";
import { equal, randomBytes } from "./bytes.js";
import { verifyAttestation } from "./attestation.js";
import { ProtocolError, Type, decodeFrame, decodeStrict, encodeFrame, fields } from "./frames.js";
import { predictionProblem } from "./prediction.js";
import { SessionCipher, Transcript, checkConfirmation, deriveKeys, openSession } from "./session.js";

const NONCE_SIZE = 32;
export const WINDOW = 4;              // requests in flight, as parent.py classify
const BUSY_RETRIES = 8;               // re-sends of an image the enclave answered BUSY
export const MAX_IMAGE_BYTES = 24 * 1024 * 1024 - 64 * 1024;  // wire/messages.py MAX_IMAGE_IN_MESSAGE
const ANSWER_TIMEOUT_MS = 60_000;

export class RemoteError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
  get check() { return "RemoteError"; }
}

/** The WebSocket to the relay, read one frame at a time. */
export class Relay {
  static open(url) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      ws.onopen = () => resolve(new Relay(ws));
      ws.onerror = () => reject(new ProtocolError(`cannot reach the relay at ${url}`));
    });
  }

  constructor(ws) {
    this.ws = ws;
    this.frames = [];
    this.waiting = null;
    this.closed = false;
    this.sent = 0;
    ws.onmessage = (event) => this.deliver(new Uint8Array(event.data));
    ws.onclose = () => { this.closed = true; this.deliver(null); };
  }

  deliver(item) {
    this.frames.push(item);
    if (this.waiting) this.waiting();
  }

  send(frame) {
    if (this.closed) throw new ProtocolError("the connection to the enclave is closed");
    this.ws.send(frame);
    this.sent++;
  }

  async next(timeoutMs = ANSWER_TIMEOUT_MS) {
    const deadline = Date.now() + timeoutMs;
    while (!this.frames.length) {
      const left = deadline - Date.now();
      if (left <= 0) throw new ProtocolError(`no answer from the enclave within ${timeoutMs / 1000} s`);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiting = () => { clearTimeout(timer); resolve(); };
      });
      this.waiting = null;
    }
    const item = this.frames.shift();
    if (item === null) {
      this.frames.unshift(null); // stays closed
      throw new ProtocolError("the enclave closed the connection");
    }
    const frame = decodeFrame(item);
    if (frame.type === Type.ERROR) {
      const { code, message } = fields(frame, ["code", "message"]);
      throw new RemoteError(String(code), String(message));
    }
    return frame;
  }
}

function expect(frame, type) {
  if (frame.type !== type) throw new ProtocolError(`expected ${Object.keys(Type).find((k) => Type[k] === type)}, got ${frame.name}`);
  return frame;
}

/**
 * HELLO with a fresh nonce, then verify the ATTESTATION answer (throws AttestationError
 * naming the failed check: then nothing more is sent). Returns what the session needs.
 */
export async function attest(relay, { policy, trustedRoots }) {
  const transcript = new Transcript();
  const nonce = randomBytes(NONCE_SIZE);
  const hello = encodeFrame(Type.HELLO, { nonce });
  transcript.add(Type.HELLO, hello.subarray(12));
  relay.send(hello);
  const frame = expect(await relay.next(), Type.ATTESTATION);
  const { public_key: offeredKey, document } = fields(frame, ["public_key", "document"]);
  if (!(offeredKey instanceof Uint8Array) || !(document instanceof Uint8Array))
    throw new ProtocolError("ATTESTATION: expected bytes");
  transcript.add(frame.type, frame.body);
  const result = await verifyAttestation(document, { now: Date.now(), policy, nonce, trustedRoots, offeredKey });
  return { nonce, transcript, result };
}

/** SESSION_OPEN to the attested key; returns the session's cipher once the enclave confirmed. */
export async function establish(relay, { nonce, transcript, result }) {
  const { secret, sessionId, wrapped } = await openSession(result.publicKey, nonce, result.userData);
  const open = encodeFrame(Type.SESSION_OPEN, { session_id: sessionId, wrapped_secret: wrapped });
  transcript.add(Type.SESSION_OPEN, open.subarray(12));
  const t2 = await transcript.digest();
  const keys = await deriveKeys(secret, nonce, result.userData, sessionId, t2);
  relay.send(open);
  const ready = fields(expect(await relay.next(), Type.SESSION_READY), ["session_id", "confirmation"]);
  if (!equal(ready.session_id, sessionId)) throw new ProtocolError("the enclave confirmed a different session id");
  await checkConfirmation(keys, t2, ready.confirmation);
  return new SessionCipher(keys, sessionId);
}

function checkPayload(value) {
  const bad = () => { throw new ProtocolError("expected {'request': n, 'result' | 'error': ...}"); };
  if (value === null || typeof value !== "object" || !Number.isInteger(value.request)) bad();
  if (value.result) {
    const problem = predictionProblem(value.result);
    if (problem) throw new ProtocolError(problem);
    return value;
  }
  if (!value.error || typeof value.error.code !== "string" || typeof value.error.message !== "string") bad();
  return value;
}

/**
 * Send every image of ``items`` ({bytes} or {error: [code, message]}) over the session,
 * WINDOW in flight; ``onAnswer(index, result | null, error | null)`` for each.
 */
export async function classifyMany(relay, cipher, items, onAnswer) {
  const queue = [];
  items.forEach((item, index) => {
    if (item.error) onAnswer(index, null, item.error);
    else queue.push(index);
  });
  const pending = new Map();
  const retries = new Map();
  while (queue.length || pending.size) {
    while (queue.length && pending.size < WINDOW) {
      const index = queue.shift();
      const { counter, ciphertext } = await cipher.seal(Type.SESSION_CLASSIFY, encode({ image: items[index].bytes }));
      relay.send(encodeFrame(Type.SESSION_CLASSIFY, { counter, ciphertext }));
      pending.set(counter, index);
    }
    const answer = fields(expect(await relay.next(), Type.SESSION_RESULT), ["counter", "ciphertext"]);
    const plain = await cipher.open(Type.SESSION_RESULT, answer.counter, answer.ciphertext);
    const payload = checkPayload(decodeStrict(plain));
    const index = pending.get(payload.request);
    if (index === undefined) throw new ProtocolError("the enclave answered a request that was not sent");
    pending.delete(payload.request);
    if (payload.error && payload.error.code === "BUSY" && (retries.get(index) || 0) < BUSY_RETRIES) {
      retries.set(index, (retries.get(index) || 0) + 1);
      await new Promise((resolve) => setTimeout(resolve, 50 * retries.get(index)));
      queue.push(index);
      continue;
    }
    if (payload.error) onAnswer(index, null, [payload.error.code, payload.error.message]);
    else onAnswer(index, payload.result, null);
  }
}
