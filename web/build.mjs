// Builds dist/ from src/: the bundle (esbuild, pinned in package-lock.json), the stylesheet,
// and index.html with Subresource Integrity hashes of both. Deterministic: the same sources
// and locked versions give the same bytes (tests/test_web.py rebuilds and compares).
//   npm ci && node build.mjs [OUTDIR]
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { build } from "esbuild";

const out = process.argv[2] || "dist";
mkdirSync(out, { recursive: true });
await build({
  entryPoints: ["src/app.js"],
  bundle: true,
  format: "iife", // a classic script: it also runs from a copy saved to disk (file://)
  minify: true,
  target: "es2022",
  legalComments: "eof",
  outfile: join(out, "app.js"),
});
copyFileSync("src/style.css", join(out, "style.css"));
const sri = (file) => "sha384-" + createHash("sha384").update(readFileSync(join(out, file))).digest("base64");
const html = readFileSync("src/index.html", "utf8")
  .replace("{{APP_SRI}}", sri("app.js"))
  .replace("{{STYLE_SRI}}", sri("style.css"));
writeFileSync(join(out, "index.html"), html);
const bundle = readFileSync(join(out, "app.js"));
console.log(`app.js ${bundle.length} bytes, sha256 ${createHash("sha256").update(bundle).digest("hex")}`);
