#!/usr/bin/env node
// Builds contracts/build/<Name>.json from contracts/src/*.sol with the pinned
// npm solc (wasm, offline) through standard JSON, because the solcjs CLI cannot
// set evmVersion and the EthereumJS Clique client only runs "london" bytecode.
//
//   node compile.js                 write build/<Name>.json
//   node compile.js --out DIR       write to DIR instead (the reproducibility test uses this)
//   node compile.js --check         exit 1 if build/ differs from a fresh compile
'use strict';

const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const PINNED_SOLC = '0.8.37';
const SRC_DIR = path.join(__dirname, 'src');
const BUILD_DIR = path.join(__dirname, 'build');
// Contracts that get an artifact; the other sources are bases and libraries.
// ReentrantPayout is a test double (tests/contracts/test_rewards.py).
const DEPLOYABLE = ['Registry', 'CrowdTasks', 'ReentrantPayout'];
const SETTINGS = {
  evmVersion: 'london',
  optimizer: { enabled: true, runs: 200 },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};

function sha256(text) {
  return crypto.createHash('sha256').update(text, 'utf8').digest('hex');
}

function readSources() {
  // Source keys are relative ("src/X.sol") so the metadata hash in the bytecode
  // does not depend on where the checkout lives.
  const sources = {};
  for (const name of fs.readdirSync(SRC_DIR).filter((f) => f.endsWith('.sol')).sort()) {
    sources[`src/${name}`] = { content: fs.readFileSync(path.join(SRC_DIR, name), 'utf8') };
  }
  return sources;
}

function compile() {
  const version = solc.version();
  if (!version.startsWith(`${PINNED_SOLC}+`)) {
    throw new Error(`solc ${version} found, ${PINNED_SOLC} required (run: npm ci --prefix contracts)`);
  }
  const sources = readSources();
  const output = JSON.parse(solc.compile(JSON.stringify({ language: 'Solidity', sources, settings: SETTINGS })));
  const errors = (output.errors || []).filter((e) => e.severity === 'error');
  for (const e of output.errors || []) process.stderr.write(`${e.formattedMessage}\n`);
  if (errors.length > 0) throw new Error(`${errors.length} compile error(s)`);

  const sourceHashes = {};
  for (const key of Object.keys(sources).sort()) sourceHashes[key] = sha256(sources[key].content);

  const artifacts = {};
  for (const name of DEPLOYABLE) {
    const sourceName = `src/${name}.sol`;
    const contract = output.contracts[sourceName] && output.contracts[sourceName][name];
    if (!contract) throw new Error(`${name} not found in ${sourceName}`);
    const artifact = {
      contractName: name,
      sourceName,
      compiler: { name: 'solc', version },
      settings: { evmVersion: SETTINGS.evmVersion, optimizer: SETTINGS.optimizer },
      sourceSha256: sourceHashes[sourceName],
      sources: sourceHashes,
      abi: contract.abi,
      bytecode: `0x${contract.evm.bytecode.object}`,
      deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
    };
    artifacts[`${name}.json`] = `${JSON.stringify(artifact, null, 2)}\n`;
  }
  return artifacts;
}

function main(argv) {
  const outIdx = argv.indexOf('--out');
  const outDir = outIdx >= 0 ? path.resolve(argv[outIdx + 1]) : BUILD_DIR;
  const artifacts = compile();
  if (argv.includes('--check')) {
    const stale = Object.keys(artifacts).filter((file) => {
      const p = path.join(BUILD_DIR, file);
      return !fs.existsSync(p) || fs.readFileSync(p, 'utf8') !== artifacts[file];
    });
    if (stale.length > 0) {
      process.stderr.write(`stale artifacts: ${stale.join(', ')} (run: node contracts/compile.js)\n`);
      return 1;
    }
    process.stdout.write(`artifacts up to date: ${Object.keys(artifacts).join(', ')}\n`);
    return 0;
  }
  fs.mkdirSync(outDir, { recursive: true });
  for (const [file, text] of Object.entries(artifacts)) {
    fs.writeFileSync(path.join(outDir, file), text);
    process.stdout.write(`wrote ${path.join(outDir, file)}\n`);
  }
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (err) {
  process.stderr.write(`compile.js: ${err.message}\n`);
  process.exitCode = 2;
}
