// Frames and message bodies, as nitrolesion/wire/frames.py and messages.py define them:
// b"NL" | version (2) | type | body length (8 bytes, big-endian) | CBOR body.
import { decode, encode } from "cbor2";
import { concat, u64 } from "./bytes.js";

export const PROTOCOL_VERSION = 2;
export const HEADER_SIZE = 12;
export const Type = Object.freeze({
  HELLO: 3, ATTESTATION: 4, SESSION_OPEN: 8, SESSION_READY: 9,
  SESSION_CLASSIFY: 10, SESSION_RESULT: 11, ERROR: 12, GOODBYE: 13,
});
const NAMES = Object.fromEntries(Object.entries(Type).map(([name, code]) => [code, name]));

export class ProtocolError extends Error {
  get check() { return "ProtocolError"; }
}

/** Strict CBOR for peer bytes: no indefinite lengths, no duplicate keys. */
export function decodeStrict(bytes) {
  return decode(bytes, { rejectStreaming: true, rejectDuplicateKeys: true });
}

export function encodeFrame(type, fields) {
  const body = encode(fields);
  return concat(new Uint8Array([0x4e, 0x4c, PROTOCOL_VERSION, type]), u64(body.length), body);
}

/** One WebSocket message is one frame: check its header, return {type, body, name}. */
export function decodeFrame(bytes) {
  if (bytes.length < HEADER_SIZE || bytes[0] !== 0x4e || bytes[1] !== 0x4c)
    throw new ProtocolError("not a frame (bad magic or too short)");
  if (bytes[2] !== PROTOCOL_VERSION)
    throw new ProtocolError(`unsupported protocol version ${bytes[2]}: this page speaks ${PROTOCOL_VERSION}`);
  const length = new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(4);
  if (length !== BigInt(bytes.length - HEADER_SIZE))
    throw new ProtocolError("frame length does not match the message");
  const type = bytes[3];
  if (!(type in NAMES)) throw new ProtocolError(`unexpected message type ${type}`);
  return { type, name: NAMES[type], body: bytes.subarray(HEADER_SIZE) };
}

/** The body's fields, exactly ``names`` (like messages.py's from_fields); bytes checked. */
export function fields(frame, names) {
  let value;
  try {
    value = decodeStrict(frame.body);
  } catch (e) {
    throw new ProtocolError(`${frame.name}: body is not valid CBOR`);
  }
  if (value === null || typeof value !== "object" || value instanceof Map || Array.isArray(value))
    throw new ProtocolError(`${frame.name}: expected a CBOR map`);
  const keys = Object.keys(value).sort();
  if (keys.join() !== [...names].sort().join())
    throw new ProtocolError(`${frame.name}: expected fields ${names.join(", ")}`);
  return value;
}
