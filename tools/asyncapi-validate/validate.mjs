#!/usr/bin/env node
// Validate AsyncAPI documents with the official parser: `node validate.mjs doc.json [...]`.
// Prints every diagnostic; exits 1 when a document has an error (warnings alone pass).
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const files = process.argv.slice(2);
if (files.length === 0) {
  console.error("usage: node validate.mjs FILE.json|FILE.yaml [...]");
  process.exit(2);
}
const parser = new Parser();
let failed = false;
for (const file of files) {
  const source = await readFile(file, "utf8");
  const { document, diagnostics } = await parser.parse(source, { source: file });
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
  for (const d of diagnostics) {
    const level = Object.keys(DiagnosticSeverity).find((k) => DiagnosticSeverity[k] === d.severity);
    console.log(`${file}: ${level}: ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  if (!document || errors.length > 0) {
    failed = true;
    console.log(`${file}: INVALID (${errors.length} error(s))`);
  } else {
    const channels = document.channels().length;
    const operations = document.operations().length;
    console.log(`${file}: valid AsyncAPI ${document.version()} (${channels} channels, ${operations} operations)`);
  }
}
process.exit(failed ? 1 : 0);
