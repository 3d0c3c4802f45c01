// The prediction a sealed result carries, checked as nitrolesion/wire/messages.py
// check_prediction checks it, before the page shows or saves anything of it. No imports:
// tests/test_web.py runs it under Node beside the Python check on the same maps.

export const REFER_REASONS = ["malignant", "not_a_lesion"];
export const PREDICTION_FIELDS = ["code", "name", "confidence", "probabilities", "malignant", "refer", "refer_reason"];
const MAX_CLASSES = 16;
const MAX_LABEL_TEXT = 128;

const isProbability = (p) => typeof p === "number" && p >= 0 && p <= 1;
const isText = (t, limit) => typeof t === "string" && [...t].length <= limit;  // code points, as Python's len

/** What is wrong with the decoded prediction map ``value``, or null when nothing is. */
export function predictionProblem(value) {
  if (value === null || typeof value !== "object" || Array.isArray(value) || value instanceof Map
    || Object.keys(value).sort().join() !== [...PREDICTION_FIELDS].sort().join())
    return `prediction: expected fields ${PREDICTION_FIELDS.join(", ")}`;
  const { probabilities } = value;
  const classes = probabilities !== null && typeof probabilities === "object" && !Array.isArray(probabilities)
    ? Object.entries(probabilities) : [];
  if (classes.length === 0 || classes.length > MAX_CLASSES) return `prediction: expected 1..${MAX_CLASSES} probabilities`;
  if (typeof value.refer !== "boolean") return "field 'refer': expected true or false";
  if (value.refer && !REFER_REASONS.includes(value.refer_reason))
    return `field 'refer_reason': expected one of (${REFER_REASONS.map((r) => `'${r}'`).join(", ")}) when refer is true`;
  if (!value.refer && value.refer_reason !== null) return "field 'refer_reason': expected null when refer is false";
  if (!isText(value.code, 32)) return "field 'code': expected text of at most 32 characters";
  if (!isText(value.name, MAX_LABEL_TEXT)) return `field 'name': expected text of at most ${MAX_LABEL_TEXT} characters`;
  if (!isProbability(value.confidence)) return "field 'confidence': expected a probability in [0, 1]";
  for (const [code, p] of classes) {
    if (!isText(code, 32)) return "field 'class': expected text of at most 32 characters";
    if (!isProbability(p)) return `field '${code}': expected a probability in [0, 1]`;
  }
  if (!isProbability(value.malignant)) return "field 'malignant': expected a probability in [0, 1]";
  return null;
}
