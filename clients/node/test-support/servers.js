// Test helpers: start the real Python service on a free port, and tiny local stub servers.
// Kept outside test/ so that `node --test` does not run this file as a test file.

import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

/** The service's CLI: $MOVIEMATCH_ML_BIN if set, else `moviematch-ml` from PATH (CI activates the venv). */
export const SERVICE_BIN = process.env.MOVIEMATCH_ML_BIN || 'moviematch-ml';
const READY_TIMEOUT_MS = 90_000;

/** A TCP port nothing listens on right now (bound on 127.0.0.1, then released). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/**
 * Start `moviematch-ml serve` on a free port and wait until GET /health/ready answers 200.
 * `env` is added to the child's environment (e.g. MODEL_PATH); the feedback store goes to a temporary directory.
 */
export async function startService({ env = {} } = {}) {
  const dir = await mkdtemp(path.join(tmpdir(), 'moviematch-node-test-'));
  const port = await freePort();
  const baseUrl = `http://127.0.0.1:${port}`;
  let output = '';
  const child = spawn(SERVICE_BIN, ['serve', '--host', '127.0.0.1', '--port', String(port)], {
    cwd: dir,
    env: {
      ...process.env,
      DATABASE_URL: `sqlite:///${path.join(dir, 'feedback.sqlite3')}`,
      GRACEFUL_TIMEOUT: '1',
      LOG_LEVEL: 'warning',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const keep = (chunk) => {
    output = (output + chunk.toString()).slice(-20_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  let exited = null;
  const exit = new Promise((resolve) => {
    child.once('exit', (code, signal) => {
      exited = { code, signal };
      resolve(exited);
    });
    child.once('error', (error) => {
      exited = { error };
      resolve(exited);
    });
  });

  const stop = async () => {
    if (exited === null) {
      child.kill('SIGTERM');
      const done = await Promise.race([exit, delay(10_000, 'timeout')]);
      if (done === 'timeout') {
        child.kill('SIGKILL');
        await exit;
      }
    }
    await rm(dir, { recursive: true, force: true });
  };

  const started = Date.now();
  for (;;) {
    if (exited !== null) {
      await rm(dir, { recursive: true, force: true });
      const why = exited.error
        ? `${exited.error.message} (set MOVIEMATCH_ML_BIN to the moviematch-ml executable, or activate the venv)`
        : `exit code ${exited.code}, signal ${exited.signal}`;
      throw new Error(`${SERVICE_BIN} serve stopped before it was ready: ${why}\n${output}`);
    }
    try {
      const response = await fetch(`${baseUrl}/health/ready`, { signal: AbortSignal.timeout(2000) });
      await response.arrayBuffer();
      if (response.status === 200) break;
    } catch {
      // Not listening yet.
    }
    if (Date.now() - started > READY_TIMEOUT_MS) {
      await stop();
      throw new Error(`${SERVICE_BIN} serve was not ready after ${READY_TIMEOUT_MS} ms\n${output}`);
    }
    await delay(100);
  }
  return { baseUrl, port, stop, output: () => output };
}

/**
 * A local HTTP server answering with `handler(req, res, n)` (n: 1-based request count); records every request
 * (method, url, headers, body) in `requests`.
 */
export async function startStub(handler) {
  const requests = [];
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const body = Buffer.concat(chunks).toString();
      requests.push({ method: req.method, url: req.url, headers: req.headers, body, at: performance.now() });
      handler(req, res, requests.length, body);
    });
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    requests,
    server,
    close: async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Answer a stub request with JSON. */
export function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

/** A base URL where nothing listens (connections are refused). */
export async function deadUrl() {
  return `http://127.0.0.1:${await freePort()}`;
}

/** Six valid features: a well-known film that matches the user's taste. */
export function sampleFeatures(overrides = {}) {
  return {
    n_shared_genres: 2,
    vote_average: 7.5,
    vote_count: 1000,
    is_favorite_genre: 1,
    years_since_release: 3,
    popularity: 50.0,
    ...overrides,
  };
}
