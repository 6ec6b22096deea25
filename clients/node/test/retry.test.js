// Retries, timeouts, Retry-After and headers, against tiny local stub servers (no Python service needed).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  DEFAULT_RETRY_POLICY,
  HttpError,
  NetworkError,
  TimeoutError,
  backoffDelay,
  createClient,
  parseRetryAfter,
} from '../mlModelService.js';
import { deadUrl, sampleFeatures, sendJson, startStub } from '../test-support/servers.js';

const OK = { predicted_rating: 7.9, model_version: 'stub-1', source: 'model', prediction_id: 'a'.repeat(32) };
// Tiny backoff so that tests measure Retry-After, not the jitter.
const FAST = { baseDelayMs: 1, maxDelayMs: 5 };

describe('retry policy as data', () => {
  test('the default policy retries 408, 429, 500, 502, 503, 504 and network errors, twice', () => {
    assert.deepEqual([...DEFAULT_RETRY_POLICY.statusCodes], [408, 429, 500, 502, 503, 504]);
    assert.equal(DEFAULT_RETRY_POLICY.networkErrors, true);
    assert.equal(DEFAULT_RETRY_POLICY.limit, 2);
    assert.throws(() => createClient({ retries: -1 }), TypeError);
    assert.equal(createClient({ retries: 5 }).retryPolicy.limit, 5);
    assert.equal(createClient({ retries: { maxDelayMs: 9 } }).retryPolicy.limit, 2);
  });

  test('backoff is full jitter under an exponential, capped ceiling', () => {
    const policy = { baseDelayMs: 100, maxDelayMs: 1000 };
    assert.equal(
      backoffDelay(policy, 0, () => 0),
      0,
    );
    assert.equal(
      backoffDelay(policy, 0, () => 0.5),
      50,
    ); // ceiling 100 * 2^0
    assert.equal(
      backoffDelay(policy, 2, () => 0.5),
      200,
    ); // ceiling 100 * 2^2
    assert.equal(
      backoffDelay(policy, 10, () => 0.5),
      500,
    ); // ceiling capped at 1000
  });

  test('Retry-After is read as seconds or as an HTTP-date', () => {
    const now = Date.parse('2026-01-01T00:00:00Z');
    assert.equal(parseRetryAfter('3', now), 3000);
    assert.equal(parseRetryAfter('0', now), 0);
    assert.equal(parseRetryAfter('Thu, 01 Jan 2026 00:00:07 GMT', now), 7000);
    assert.equal(parseRetryAfter('Wed, 31 Dec 2025 23:00:00 GMT', now), 0); // in the past: no wait
    assert.equal(parseRetryAfter('soon', now), undefined);
    assert.equal(parseRetryAfter(null, now), undefined);
  });
});

describe('retries against a stub', () => {
  test('a 503 is retried and the second answer is returned', async (t) => {
    const stub = await startStub((req, res, n) =>
      n === 1 ? sendJson(res, 503, { error: 'not_ready', message: 'warming up' }) : sendJson(res, 200, OK),
    );
    t.after(stub.close);
    const retries = [];
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST, onRetry: (info) => retries.push(info) });
    assert.deepEqual(await client.predictMovieRating(sampleFeatures()), OK);
    assert.equal(stub.requests.length, 2);
    assert.equal(retries.length, 1);
    assert.equal(retries[0].attempt, 1);
    assert.equal(retries[0].error.status, 503);
    // Both attempts carry the same body.
    assert.equal(stub.requests[0].body, stub.requests[1].body);
  });

  test('gives up after the retry limit with the last HttpError', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 502, { error: 'bad_gateway', message: 'upstream down' }));
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: { ...FAST, limit: 2 } });
    const error = await client.predictMovieRating(sampleFeatures()).catch((e) => e);
    assert.ok(error instanceof HttpError);
    assert.equal(error.status, 502);
    assert.equal(error.attempts, 3);
    assert.equal(stub.requests.length, 3);
    assert.match(
      error.message,
      /^POST http:\/\/127\.0\.0\.1:\d+\/predict failed with HTTP 502 \(bad_gateway: upstream down\)$/,
    );
  });

  test('429 is retried; 400 and 404 are not', async (t) => {
    const stub = await startStub((req, res, n) => {
      if (req.url === '/predict')
        return n === 1 ? sendJson(res, 429, { error: 'rate_limited' }) : sendJson(res, 200, OK);
      return sendJson(res, req.url === '/health' ? 400 : 404, { error: 'nope', message: 'no' });
    });
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    assert.deepEqual(await client.predictMovieRating(sampleFeatures()), OK);
    assert.equal(stub.requests.length, 2);
    await assert.rejects(client.checkHealth(), { name: 'HttpError', status: 400, attempts: 1 });
    await assert.rejects(client.request('GET', '/missing', { idempotent: true }), { status: 404, attempts: 1 });
    assert.equal(stub.requests.length, 4);
  });

  test('a request not marked idempotent is never retried', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 503, { error: 'not_ready' }));
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    await assert.rejects(client.request('POST', '/something', { body: {} }), { status: 503, attempts: 1 });
    assert.equal(stub.requests.length, 1);
  });

  test('a dropped connection is retried as a network error', async (t) => {
    const stub = await startStub((req, res, n) => (n === 1 ? req.socket.destroy() : sendJson(res, 200, OK)));
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    assert.deepEqual(await client.predictMovieRating(sampleFeatures()), OK);
    assert.equal(stub.requests.length, 2);
  });

  test('Retry-After in seconds is honoured', async (t) => {
    const stub = await startStub((req, res, n) =>
      n === 1 ? sendJson(res, 503, { error: 'not_ready' }, { 'retry-after': '1' }) : sendJson(res, 200, OK),
    );
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    assert.deepEqual(await client.predictMovieRating(sampleFeatures()), OK);
    const waited = stub.requests[1].at - stub.requests[0].at;
    // FAST backoff alone would wait at most 5 ms.
    assert.ok(waited >= 990, `second attempt came after ${waited.toFixed(0)} ms, expected >= 1000`);
    assert.ok(waited < 3000, `second attempt came after ${waited.toFixed(0)} ms`);
  });

  test('Retry-After as an HTTP-date is honoured', async (t) => {
    let target;
    const stub = await startStub((req, res, n) => {
      if (n > 1) return sendJson(res, 200, OK);
      // Two whole seconds ahead: an HTTP-date has one-second resolution, so the wait is between 1 and 2 s.
      target = new Date(Math.ceil(Date.now() / 1000) * 1000 + 2000);
      return sendJson(res, 429, { error: 'rate_limited' }, { 'retry-after': target.toUTCString() });
    });
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    const started = Date.now();
    assert.deepEqual(await client.predictMovieRating(sampleFeatures()), OK);
    assert.ok(Date.now() >= target.getTime() - 5, 'answered before the Retry-After date');
    assert.ok(Date.now() - started >= 990);
  });

  test('a Retry-After beyond the overall timeout fails at once instead of waiting', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 503, { error: 'not_ready' }, { 'retry-after': '30' }));
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, timeoutMs: 2000, retries: FAST });
    const started = performance.now();
    await assert.rejects(client.predictMovieRating(sampleFeatures()), { name: 'HttpError', status: 503, attempts: 1 });
    assert.ok(performance.now() - started < 1000);
    assert.equal(stub.requests.length, 1);
  });
});

describe('timeouts', () => {
  let silent;
  before(async () => {
    // Accepts the request and never answers.
    silent = await startStub(() => {});
  });
  after(() => silent.close());

  test('a service that never answers raises TimeoutError after timeoutMs', async () => {
    const client = createClient({ baseUrl: silent.baseUrl, timeoutMs: 300 });
    const started = performance.now();
    const error = await client.predictMovieRating(sampleFeatures()).catch((e) => e);
    const elapsed = performance.now() - started;
    assert.ok(error instanceof TimeoutError, String(error));
    assert.equal(error.timeoutMs, 300);
    assert.match(error.message, /^POST http:\/\/127\.0\.0\.1:\d+\/predict timed out after 300 ms \(1 attempt\)$/);
    assert.ok(elapsed >= 295 && elapsed < 2000, `took ${elapsed} ms`);
  });

  test('a per-call timeoutMs overrides the client default', async () => {
    const client = createClient({ baseUrl: silent.baseUrl, timeoutMs: 60_000 });
    await assert.rejects(client.checkHealth({ timeoutMs: 200 }), { name: 'TimeoutError', timeoutMs: 200 });
  });

  test('retries never run past the overall timeout', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 503, { error: 'not_ready' }));
    t.after(stub.close);
    // Backoff of up to 10 s per retry, budget 400 ms: the client must stop at the budget, not sleep through it.
    // It ends with the last 503, or with a TimeoutError if a short backoff happened to use the budget up.
    const client = createClient({
      baseUrl: stub.baseUrl,
      timeoutMs: 400,
      retries: { limit: 50, baseDelayMs: 10_000, maxDelayMs: 10_000 },
    });
    const started = performance.now();
    await assert.rejects(
      client.predictMovieRating(sampleFeatures()),
      (e) => e instanceof HttpError || e instanceof TimeoutError,
    );
    const elapsed = performance.now() - started;
    assert.ok(elapsed < 1500, `stopped after ${elapsed.toFixed(0)} ms`);
  });

  test("the caller's AbortSignal cancels at once and is not retried", async () => {
    const client = createClient({ baseUrl: silent.baseUrl, timeoutMs: 60_000 });
    const controller = new AbortController();
    const pending = client.predictMovieRating(sampleFeatures(), { signal: controller.signal, fallback: true });
    setTimeout(() => controller.abort(), 50);
    await assert.rejects(pending, { name: 'AbortError' });
  });
});

describe('requests as sent', () => {
  test('JSON body, Authorization only when an API key is set, X-Request-ID when given', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 200, OK));
    t.after(stub.close);
    await createClient({ baseUrl: `${stub.baseUrl}/` }).predictMovieRating(sampleFeatures(), {
      userId: 42,
      movieId: 'tt01',
    });
    await createClient({ baseUrl: stub.baseUrl, apiKey: 's3cret' }).predictMovieRating(sampleFeatures(), {
      requestId: 'req-1',
    });
    const [plain, keyed] = stub.requests;
    assert.equal(plain.method, 'POST');
    assert.equal(plain.url, '/predict');
    assert.equal(plain.headers['content-type'], 'application/json');
    assert.equal(plain.headers.authorization, undefined);
    assert.deepEqual(JSON.parse(plain.body), { ...sampleFeatures(), user_id: 42, movie_id: 'tt01' });
    assert.equal(keyed.headers.authorization, 'Bearer s3cret');
    assert.equal(keyed.headers['x-request-id'], 'req-1');
  });

  test('a base URL path prefix is kept', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 200, { status: 'ok' }));
    t.after(stub.close);
    await createClient({ baseUrl: `${stub.baseUrl}/ml/` }).checkHealth();
    assert.equal(stub.requests[0].url, '/ml/health');
  });

  test('batch options map to the contract names', async (t) => {
    const stub = await startStub((req, res) =>
      sendJson(res, 200, { predictions: [], model_version: 'x', count: 0, ranked: true }),
    );
    t.after(stub.close);
    const movies = [{ movie_id: 1, ...sampleFeatures() }];
    const client = createClient({ baseUrl: stub.baseUrl });
    await client.predictMultipleMovies(movies, { userId: 'u1', rank: true, topK: 5 });
    assert.equal(stub.requests[0].url, '/predict-batch');
    assert.deepEqual(JSON.parse(stub.requests[0].body), { movies, user_id: 'u1', rank: true, top_k: 5 });
    // The request body itself is accepted as well; options still apply on top.
    await client.predictMultipleMovies({ movies, top_k: 2 }, { userId: 7 });
    assert.deepEqual(JSON.parse(stub.requests[1].body), { movies, top_k: 2, user_id: 7 });
  });

  test('feedback carries one Idempotency-Key, the same on every retry', async (t) => {
    const stub = await startStub((req, res, n) =>
      n === 1
        ? sendJson(res, 503, { error: 'not_ready' })
        : sendJson(res, 201, { accepted: 1, duplicates: 0, results: [] }),
    );
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: FAST });
    await client.sendFeedback({ user_id: 1, movie_id: 2, rating: 8 });
    await client.sendFeedback([{ user_id: 1, movie_id: 3, rating: 6 }], { idempotencyKey: 'mine' });
    const [first, retry, own] = stub.requests;
    assert.match(first.headers['idempotency-key'], /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
    assert.equal(retry.headers['idempotency-key'], first.headers['idempotency-key']);
    assert.equal(own.headers['idempotency-key'], 'mine');
    assert.deepEqual(JSON.parse(own.body), { ratings: [{ user_id: 1, movie_id: 3, rating: 6 }] });
  });

  test('invalid arguments fail fast with TypeError', async () => {
    assert.throws(() => createClient({ baseUrl: 'not a url' }), TypeError);
    assert.throws(() => createClient({ baseUrl: 'ftp://x' }), TypeError);
    assert.throws(() => createClient({ timeoutMs: 0 }), TypeError);
    assert.throws(() => createClient({ timeoutMs: 2 ** 31 }), TypeError); // setTimeout would fire at once
    const client = createClient({ baseUrl: await deadUrl() }); // nothing may reach a real port
    await assert.rejects(client.predictMovieRating(null), TypeError);
    await assert.rejects(client.predictMultipleMovies({ films: [] }), TypeError);
    await assert.rejects(client.predictMultipleMovies('movies'), TypeError);
    await assert.rejects(client.sendFeedback(8), TypeError);
  });

  test('a malformed request (invalid header value) is thrown as is, not retried as a network error', async (t) => {
    const stub = await startStub((req, res) => sendJson(res, 200, OK));
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, apiKey: 'bad\nkey', retries: FAST });
    await assert.rejects(client.predictMovieRating(sampleFeatures()), (error) => {
      assert.equal(error.constructor, TypeError);
      assert.match(error.message, /invalid header value/);
      return true;
    });
    assert.equal(stub.requests.length, 0);
  });

  test('the default base URL is IPv4 loopback, port 8000', () => {
    assert.equal(createClient().baseUrl, 'http://127.0.0.1:8000');
  });

  test('a non-JSON error page: plain text is quoted, HTML is not', async (t) => {
    const stub = await startStub((req, res) => {
      const html = req.url === '/health';
      res.writeHead(502, { 'content-type': html ? 'text/html' : 'text/plain' });
      res.end(
        html ? '<html><body><h1>Application failed to respond</h1></body></html>' : 'upstream connect error\nmore',
      );
    });
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, retries: 0 });
    const page = await client.checkHealth().catch((e) => e);
    assert.equal(page.message, `GET ${stub.baseUrl}/health failed with HTTP 502 (Bad Gateway)`);
    assert.match(page.body, /^<html>/);
    const text = await client.predictMovieRating(sampleFeatures()).catch((e) => e);
    assert.equal(text.message, `POST ${stub.baseUrl}/predict failed with HTTP 502 (upstream connect error)`);
  });

  test('a network error names method, URL and cause', async () => {
    const url = await deadUrl();
    const client = createClient({ baseUrl: url, retries: FAST });
    const error = await client.checkHealth().catch((e) => e);
    assert.ok(error instanceof NetworkError, String(error));
    assert.equal(error.code, 'ECONNREFUSED');
    assert.equal(error.attempts, 3);
    assert.ok(error.message.startsWith(`GET ${url}/health failed: `), error.message);
    assert.match(error.message, /ECONNREFUSED/);
  });
});
