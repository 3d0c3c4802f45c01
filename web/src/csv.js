// The results file the page downloads: the same columns, values and provenance lines as
// `parent.py classify --out results.csv` (nitrolesion/parent/classify.py write_results),
// numbers written as Python writes floats, so one reader handles both.

export const CODES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"];
export const CSV_COLUMNS = ["file", "code", "label", "confidence", ...CODES.map((c) => `p_${c}`),
  "malignant", "refer", "refer_reason", "error"];
export const NOTICE = "research demonstrator, not a medical device";

/** round(x, 6) as Python does it (to the nearest double of the decimal). */
export const round6 = (x) => Number(x.toFixed(6));

/** repr(float) as Python writes it: shortest round-trip digits, exponent below 1e-4. */
export function pyFloat(x) {
  if (Number.isInteger(x) && Math.abs(x) < 1e16) return x.toFixed(1);
  const [mantissa, exponentText] = x.toExponential().split("e");
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= 16)
    return `${mantissa}e${exponent < 0 ? "-" : "+"}${String(Math.abs(exponent)).padStart(2, "0")}`;
  return String(x);
}

/** json.dumps as Python writes it (", " and ": " separators). */
export function pyJson(value) {
  if (value === null || value === undefined) return "null";
  if (Array.isArray(value)) return `[${value.map(pyJson).join(", ")}]`;
  if (typeof value === "object")
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyJson(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}

const quote = (text) => `"${String(text).replaceAll('"', '""')}"`;
const safeLine = (text) => String(text).replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, "?");

/** The summary block of classify.summary_of for the finished ``rows`` of ``total``. */
export function summaryOf(rows, seconds, total = rows.length) {
  const ok = rows.filter((r) => !r.error);
  const count = (list) => Object.fromEntries(Object.entries(list.reduce((m, k) => ({ ...m, [k]: (m[k] || 0) + 1 }), {})).sort());
  return {
    images: total, classified: ok.length, failed: rows.length - ok.length,
    failed_by_reason: count(rows.filter((r) => r.error).map((r) => r.error.code)),
    interrupted: total - rows.length, complete: rows.length === total,
    by_code: count(ok.map((r) => r.code)),
    referred: ok.filter((r) => r.refer).length,
    seconds: Number(seconds.toFixed(3)),
    images_per_second: seconds > 0 ? Number((rows.length / seconds).toFixed(2)) : null,
  };
}

/** The CSV text: '# ' provenance lines, then the header and one row per image. */
export function resultsCsv(rows, provenance, summary) {
  const lines = [`# ${NOTICE}`,
    "# provenance of these results, one 'key: value' per line; CSV readers must skip lines starting with '#' (pandas: read_csv(path, comment='#'))"];
  for (const [key, value] of Object.entries({ ...provenance, complete: summary.complete, summary })) {
    lines.push(`# ${key}: ${safeLine(typeof value === "string" ? value : pyJson(value))}`);
  }
  let text = lines.map((l) => l + "\n").join("");
  text += CSV_COLUMNS.map(quote).join(",") + "\r\n";
  for (const row of rows) {
    const cells = row.error
      ? [quote(row.file), ...Array(CSV_COLUMNS.length - 2).fill('""'), quote(`${row.error.code}: ${row.error.message}`)]
      : [quote(row.file), quote(row.code), quote(row.label), pyFloat(row.confidence),
        ...CODES.map((c) => pyFloat(row.probabilities[c])),
        pyFloat(row.malignant), quote(row.refer ? "true" : "false"), quote(row.refer_reason || ""), '""'];
    text += cells.join(",") + "\r\n";
  }
  return text;
}
