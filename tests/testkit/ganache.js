// Starts ganache for the tests (tests/testkit/src/ganache.rs), from the ganache that
// tests/package-lock.json pins (scripts/test.sh installs it with npm ci).
//
// ganache's chain (its EIP-1193 provider) behind Node's own HTTP server, rather than ganache's
// command line and server, for two reasons: the command line refuses port 0, and ganache's
// server (uWebSockets) cannot listen on its port again while connections it closed linger
// (TIME_WAIT, FIN_WAIT2: it does not set SO_REUSEADDR), which a restart test needs; Node's
// server sets it. The JSON-RPC answers are the provider's: results, and errors with ganache's
// code, message and data (revert data included), as its own server sends them; a batch's
// calls are answered one after another, in order.
//
// Once it listens, prints one JSON line: {"port": N, "accounts": [{"address", "key"}, ...]}.
// Options, a JSON object in the first argument: port (0: the kernel picks a free one, so
// parallel tests never race for a port), dbPath (a directory that keeps the chain across
// restarts), accounts (10), blockTime (seconds between blocks; 0 mines each transaction at once).
'use strict';
const http = require('http');
const path = require('path');

// LEDGER_NODE_MODULES: where the harness found the packages (tests/node_modules by default).
const modules = process.env.LEDGER_NODE_MODULES || path.join(__dirname, '..', 'node_modules');
const ganache = require(path.join(modules, 'ganache'));

const options = JSON.parse(process.argv[2] || '{}');
const provider = ganache.provider({
  wallet: { deterministic: true, totalAccounts: options.accounts || 10 },
  // ganache's newest hardfork, the one the contract is compiled for; the chain id is ganache's
  // default, written out because the tests sign for it.
  chain: { hardfork: 'shanghai', chainId: 1337 },
  miner: { blockTime: options.blockTime || 0 },
  logging: { quiet: true },
  ...(options.dbPath ? { database: { dbPath: options.dbPath } } : {}),
});

async function answer(request) {
  if (request === null || typeof request !== 'object' || typeof request.method !== 'string') {
    return { jsonrpc: '2.0', id: null, error: { code: -32600, message: 'invalid request' } };
  }
  const id = request.id === undefined ? null : request.id;
  try {
    const result = await provider.request({ method: request.method, params: request.params || [] });
    return { jsonrpc: '2.0', id, result: result === undefined ? null : result };
  } catch (e) {
    const error = { code: typeof e.code === 'number' ? e.code : -32000, message: e.message };
    if (e.data !== undefined) error.data = e.data;
    return { jsonrpc: '2.0', id, error };
  }
}

async function answerAll(body) {
  if (!Array.isArray(body)) return answer(body);
  const answers = [];
  for (const request of body) answers.push(await answer(request));
  return answers;
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', async () => {
    let reply;
    try {
      reply = await answerAll(JSON.parse(Buffer.concat(chunks).toString('utf8')));
    } catch (e) {
      reply = { jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse error: ' + e.message } };
    }
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify(reply));
  });
});

let closing = false;
function stop(status) {
  if (closing) return;
  closing = true;
  server.close();
  server.closeAllConnections();
  // disconnect() flushes the database, so a restart from dbPath finds every block.
  provider.disconnect().then(
    () => process.exit(status),
    () => process.exit(1),
  );
}
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
// The test process holds the other end of stdin: when it dies, even by SIGKILL, stdin ends and
// ganache goes with it instead of outliving the test.
process.stdin.on('end', () => stop(0));
process.stdin.resume();

server.on('error', (error) => {
  console.error('ganache: ' + error.message);
  process.exit(1);
});
server.listen(options.port || 0, '127.0.0.1', () => {
  const accounts = Object.entries(provider.getInitialAccounts()).map(([address, account]) => ({
    address,
    key: account.secretKey,
  }));
  process.stdout.write(JSON.stringify({ port: server.address().port, accounts }) + '\n');
});
