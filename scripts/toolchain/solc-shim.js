#!/usr/bin/env node
// A native-looking `solc` command over npm's solcjs (the official compiler built with
// Emscripten), so that brownie / py-solc-x compile offline with the real compiler.
//
// Supported: `--version` (answered from a cache file next to this script, brownie calls it
// many times per compile) and `--standard-json` (reads JSON on stdin, writes JSON on stdout).
// `--allow-paths`, `--base-path` and `--include-path` become import search roots.
"use strict";
const fs = require("fs");
const path = require("path");

const args = process.argv.slice(2);
const cacheFile = path.join(__dirname, ".solc-version");

function longVersion() {
  try {
    return fs.readFileSync(cacheFile, "utf8").trim();
  } catch (_) {
    const v = require("solc").version().replace(".Emscripten.clang", "");
    try { fs.writeFileSync(cacheFile, v + "\n"); } catch (_) { /* read-only checkout: fine */ }
    return v;
  }
}

function writeAndExit(text, code) {
  // Flush fully before exiting: process.exit() right after a large write cuts pipes at 64 KiB.
  process.stdout.write(text, () => process.exit(code));
}

if (args.includes("--version")) {
  writeAndExit(`solc, the solidity compiler commandline interface\nVersion: ${longVersion()}.Linux.g++\n`, 0);
} else if (args.includes("--standard-json")) {
  const roots = [process.cwd()];
  for (const flag of ["--allow-paths", "--base-path", "--include-path"]) {
    args.forEach((a, i) => {
      if (a === flag && args[i + 1]) roots.push(...args[i + 1].split(","));
      else if (a.startsWith(flag + "=")) roots.push(...a.slice(flag.length + 1).split(","));
    });
  }
  const findImports = (p) => {
    const candidates = path.isAbsolute(p) ? [p] : roots.map((r) => path.resolve(r, p));
    for (const c of candidates) {
      if (fs.existsSync(c)) return { contents: fs.readFileSync(c, "utf8") };
    }
    return { error: `File not found: ${p} (searched ${roots.join(", ")})` };
  };
  const chunks = [];
  process.stdin.on("data", (c) => chunks.push(c));
  process.stdin.on("end", () => {
    const solc = require("solc");
    let out = solc.compile(Buffer.concat(chunks).toString("utf8"), { import: findImports });
    // solcjs may prefix a non-JSON line (e.g. a deprecation notice); keep only the JSON object.
    const start = out.indexOf("{");
    if (start > 0) out = out.slice(start);
    writeAndExit(out + "\n", 0);
  });
} else {
  process.stderr.write("solc-shim: only --version and --standard-json are supported\n");
  process.exit(2);
}
