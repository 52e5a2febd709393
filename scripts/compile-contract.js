// The compiler half of scripts/compile-contract.sh (which installs solc-js first): compiles
// PolicyLedger.sol and writes, or with --check compares, PolicyLedger.json.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..');
const solc = require(path.join(root, 'tests', 'node_modules', 'solc'));
const dir = path.join(root, 'master', 'chain', 'contract');
const sourceName = 'PolicyLedger.sol';
const contractName = 'PolicyLedger';
const artifactPath = path.join(dir, contractName + '.json');

const source = fs.readFileSync(path.join(dir, sourceName), 'utf8');
const settings = {
  // ganache 7's newest hardfork: a newer target would emit opcodes (cancun's MCOPY, TSTORE)
  // that ganache, and chains not yet past shanghai, refuse.
  evmVersion: 'shanghai',
  optimizer: { enabled: true, runs: 200 },
  outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
};
const output = JSON.parse(
  solc.compile(JSON.stringify({ language: 'Solidity', sources: { [sourceName]: { content: source } }, settings })),
);
const problems = (output.errors || []).filter((e) => e.severity !== 'info');
if (problems.length > 0) {
  for (const e of problems) console.error(e.formattedMessage || e.message);
  // Warnings fail too: a clean compile is part of the contract's review.
  process.exit(1);
}
const compiled = output.contracts[sourceName][contractName];
const artifact = {
  contractName,
  sourceName,
  // The Rust crate checks this against the source (a test), so an edited source whose artifact
  // was not regenerated fails `cargo test` even where no solc is installed.
  sourceSha256: crypto.createHash('sha256').update(source).digest('hex'),
  compiler: 'solc-js ' + solc.version(),
  settings: { evmVersion: settings.evmVersion, optimizer: settings.optimizer },
  abi: compiled.abi,
  bytecode: '0x' + compiled.evm.bytecode.object,
  deployedBytecode: '0x' + compiled.evm.deployedBytecode.object,
};
const text = JSON.stringify(artifact, null, 2) + '\n';

if (process.argv.includes('--check')) {
  const committed = fs.existsSync(artifactPath) ? fs.readFileSync(artifactPath, 'utf8') : '';
  if (committed !== text) {
    console.error(
      `compile-contract: ${path.relative(root, artifactPath)} is not what ${sourceName} compiles to ` +
        `with ${artifact.compiler}: run scripts/compile-contract.sh and commit the artifact`,
    );
    process.exit(1);
  }
  console.log(`compile-contract: ${path.relative(root, artifactPath)} matches ${sourceName} (${artifact.compiler})`);
} else {
  fs.writeFileSync(artifactPath, text);
  console.log(`compile-contract: wrote ${path.relative(root, artifactPath)} (${artifact.compiler})`);
}
