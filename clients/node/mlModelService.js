// The MovieMatch ML client the backend imports: predictions, health and feedback over HTTP, with typed errors,
// bounded retries and an optional local fallback. Zero dependencies: Node 18+'s native fetch.

import { randomUUID } from 'node:crypto';
import { HttpError, MlServiceError, NetworkError, TimeoutError, ValidationError } from './errors.js';
import { LOCAL_SOURCE, predictBatchLocally, predictLocally } from './fallback.js';
import { backoffDelay, parseRetryAfter, resolveRetryPolicy } from './retry.js';

export { HttpError, MlServiceError, NetworkError, TimeoutError, ValidationError } from './errors.js';
export { DEFAULT_RETRY_POLICY, backoffDelay, parseRetryAfter } from './retry.js';
export { LOCAL_SOURCE } from './fallback.js';

// 127.0.0.1 rather than localhost: Node 17+ may resolve localhost to ::1 first, where a service bound to 0.0.0.0
// (IPv4 only, as uvicorn is by default) refuses the connection.
export const DEFAULT_BASE_URL = 'http://127.0.0.1:8000';
/** The backend's own timeout for a prediction is 30 s; here it bounds retries and their waits too. */
export const DEFAULT_TIMEOUT_MS = 30_000;
const USER_AGENT = 'moviematch-ml-node-client/0.1.0';

/**
 * Build a client with its own settings.
 *
 * @param {object} [options]
 * @param {string} [options.baseUrl] service root, e.g. "https://ml.example.com" (a path prefix is kept)
 * @param {number} [options.timeoutMs] overall budget of one call, retries and waits included (default 30000)
 * @param {number|object} [options.retries] retry limit, or a partial policy merged over DEFAULT_RETRY_POLICY
 * @param {string} [options.apiKey] sent as "Authorization: Bearer <apiKey>" when set
 * @param {typeof fetch} [options.fetch] fetch implementation (default: the global fetch)
 * @param {boolean} [options.fallback] answer predictions with the local rule when the service is unreachable
 * @param {Record<string,string>} [options.headers] extra headers sent with every request
 * @param {(info: object) => void} [options.onRetry] called before each retry (for logs and metrics)
 * @param {(error: Error, info: object) => void} [options.onFallback] called when the local rule answers
 */
export function createClient(options = {}) {
  const {
    baseUrl = DEFAULT_BASE_URL,
    timeoutMs: defaultTimeoutMs = DEFAULT_TIMEOUT_MS,
    retries,
    apiKey,
    fetch: fetchImpl,
    fallback: defaultFallback = false,
    headers: defaultHeaders = {},
    onRetry,
    onFallback,
  } = options;
  const root = normaliseBaseUrl(baseUrl);
  checkTimeout(defaultTimeoutMs, 'timeoutMs');
  const retryPolicy = resolveRetryPolicy(retries);
  if (fetchImpl !== undefined && typeof fetchImpl !== 'function') throw new TypeError('fetch must be a function');

  /**
   * One call to the service: JSON in, JSON out, retried by the policy within `timeoutMs`.
   * `idempotent` says whether sending the request twice is harmless; only then is it retried.
   */
  async function request(
    method,
    path,
    { body, timeoutMs = defaultTimeoutMs, signal, requestId, idempotent, headers } = {},
  ) {
    checkTimeout(timeoutMs, 'timeoutMs');
    const url = root + path;
    const fetchFn = fetchImpl ?? globalThis.fetch;
    if (typeof fetchFn !== 'function') throw new TypeError('no fetch available: use Node 18+ or pass options.fetch');
    const init = { method, headers: buildHeaders(headers, requestId, body !== undefined) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const deadline = Date.now() + timeoutMs;
    let attempts = 0;
    let lastError;
    for (;;) {
      signal?.throwIfAborted();
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new TimeoutError({ method, url, timeoutMs, attempts, cause: lastError });
      attempts += 1;
      const outcome = await attempt(fetchFn, url, init, remaining, signal);
      let error;
      let retryable;
      let retryAfterMs;
      if (outcome.timedOut) {
        // The per-attempt timer is the rest of the overall budget: nothing is left to retry with.
        throw new TimeoutError({ method, url, timeoutMs, attempts, cause: lastError });
      } else if (outcome.failure !== undefined) {
        error = new NetworkError({ method, url, cause: outcome.failure, attempts });
        retryable = retryPolicy.networkErrors;
      } else {
        const { response, text } = outcome;
        const parsed = parseBody(text);
        if (response.ok) {
          if (parsed.json) return parsed.value;
          throw new MlServiceError(`${method} ${url} answered HTTP ${response.status} with a body that is not JSON`, {
            method,
            url,
            attempts,
            cause: parsed.error,
          });
        }
        error = new HttpError({
          method,
          url,
          status: response.status,
          statusText: response.statusText,
          body: parsed.value,
          headers: response.headers,
          attempts,
        });
        retryable = retryPolicy.statusCodes.includes(response.status);
        if (retryPolicy.respectRetryAfter) retryAfterMs = parseRetryAfter(response.headers.get('retry-after'));
      }
      if (!retryable || !idempotent || attempts > retryPolicy.limit) throw error;
      const delayMs = retryAfterMs ?? backoffDelay(retryPolicy, attempts - 1);
      // Waiting past the deadline would only turn a clear error into a timeout: give up now instead.
      if (Date.now() + delayMs >= deadline) throw error;
      onRetry?.({ method, url, attempt: attempts, delayMs, error });
      lastError = error;
      await sleep(delayMs, signal);
    }
  }

  function buildHeaders(extra, requestId, hasBody) {
    const out = {
      accept: 'application/json',
      'user-agent': USER_AGENT,
      ...lowerKeys(defaultHeaders),
      ...lowerKeys(extra),
    };
    if (hasBody) out['content-type'] = 'application/json';
    if (apiKey) out.authorization = `Bearer ${apiKey}`;
    if (requestId) out['x-request-id'] = String(requestId);
    return out;
  }

  // Answer with the local rule when enabled and the service could not give an answer at all;
  // a 4xx (the request itself is wrong) and a caller's abort are never papered over.
  async function withFallback(callOptions, path, remote, local) {
    const enabled = callOptions.fallback ?? defaultFallback;
    try {
      return await remote();
    } catch (error) {
      if (!enabled || !isUnreachable(error)) throw error;
      let answer;
      try {
        answer = local();
      } catch (localError) {
        if (localError instanceof ValidationError) localError.cause = error;
        throw localError;
      }
      onFallback?.(error, { method: 'POST', url: root + path, source: LOCAL_SOURCE });
      return answer;
    }
  }

  /** POST /predict: six features -> `{ predicted_rating, model_version, variant, source, prediction_id }`. */
  function predictMovieRating(features, callOptions = {}) {
    if (features === null || typeof features !== 'object' || Array.isArray(features)) {
      return Promise.reject(new TypeError('predictMovieRating(features): features must be an object'));
    }
    const body = { ...features };
    if (callOptions.userId !== undefined) body.user_id = callOptions.userId;
    if (callOptions.movieId !== undefined) body.movie_id = callOptions.movieId;
    return withFallback(
      callOptions,
      '/predict',
      () => request('POST', '/predict', { ...requestOptions(callOptions), body, idempotent: true }),
      () => predictLocally(body),
    );
  }

  /**
   * POST /predict-batch: movies (each `movie_id` + six features) ->
   * `{ predictions, model_version, variant, count, ranked }`.
   * `rank` sorts best first; `topK` implies rank and keeps the best k.
   */
  function predictMultipleMovies(movies, callOptions = {}) {
    let body;
    // The array is the documented form; the request body itself ({ movies: [...] }) is accepted too, so either
    // reading of "moviesFeatures" works.
    if (Array.isArray(movies)) body = { movies };
    else if (movies !== null && typeof movies === 'object' && Array.isArray(movies.movies)) body = { ...movies };
    else {
      return Promise.reject(
        new TypeError('predictMultipleMovies(movies): movies must be an array of movies (or { movies: [...] })'),
      );
    }
    if (callOptions.userId !== undefined) body.user_id = callOptions.userId;
    if (callOptions.rank !== undefined) body.rank = callOptions.rank;
    if (callOptions.topK !== undefined && callOptions.topK !== null) body.top_k = callOptions.topK;
    return withFallback(
      callOptions,
      '/predict-batch',
      () => request('POST', '/predict-batch', { ...requestOptions(callOptions), body, idempotent: true }),
      () => predictBatchLocally(body),
    );
  }

  /** GET /health: `{ status: "ok"|"degraded", model_version, source, reason, uptime_seconds }`. */
  function checkHealth(callOptions = {}) {
    return request('GET', '/health', { ...requestOptions(callOptions), idempotent: true });
  }

  /**
   * POST /feedback: one rating `{ user_id, movie_id, rating, ... }` or an array of them. Sent with an
   * Idempotency-Key (yours, or a random UUID), which is what makes retrying it safe: the service stores each
   * rating once however many attempts reach it.
   */
  function sendFeedback(feedback, callOptions = {}) {
    let body;
    if (Array.isArray(feedback)) body = { ratings: feedback };
    else if (feedback !== null && typeof feedback === 'object') body = feedback;
    else return Promise.reject(new TypeError('sendFeedback(feedback): feedback must be an object or an array'));
    const idempotencyKey = callOptions.idempotencyKey ?? randomUUID();
    return request('POST', '/feedback', {
      ...requestOptions(callOptions),
      body,
      idempotent: true,
      headers: { ...lowerKeys(callOptions.headers), 'idempotency-key': String(idempotencyKey) },
    });
  }

  return Object.freeze({
    baseUrl: root,
    timeoutMs: defaultTimeoutMs,
    retryPolicy,
    fallback: defaultFallback,
    predictMovieRating,
    predictMultipleMovies,
    checkHealth,
    sendFeedback,
    request,
  });
}

function requestOptions({ timeoutMs, signal, requestId, headers }) {
  return { timeoutMs, signal, requestId, headers };
}

function isUnreachable(error) {
  return (
    error instanceof NetworkError ||
    error instanceof TimeoutError ||
    (error instanceof HttpError && error.status >= 500)
  );
}

// One HTTP exchange, body included, under its own timer; reports what happened instead of throwing,
// except for the caller's own abort, which propagates untouched.
async function attempt(fetchFn, url, init, remainingMs, signal) {
  const controller = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, remainingMs);
  const forwardAbort = () => controller.abort(signal.reason);
  signal?.addEventListener('abort', forwardAbort, { once: true });
  try {
    const response = await fetchFn(url, { ...init, signal: controller.signal });
    const text = await response.text();
    return { response, text };
  } catch (failure) {
    if (signal?.aborted) throw signal.reason;
    if (timedOut) return { timedOut: true };
    // Native fetch reports every network failure as TypeError("fetch failed") with the reason in `cause`; any
    // other TypeError (an invalid header value, a bad URL) is a bug in the call and is thrown as is, not retried.
    if (failure instanceof TypeError && failure.message !== 'fetch failed' && failure.cause === undefined)
      throw failure;
    return { failure };
  } finally {
    clearTimeout(timer);
    signal?.removeEventListener('abort', forwardAbort);
  }
}

function parseBody(text) {
  if (text === '') return { json: true, value: null };
  try {
    return { json: true, value: JSON.parse(text) };
  } catch (error) {
    return { json: false, value: text, error };
  }
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

function normaliseBaseUrl(baseUrl) {
  let parsed;
  try {
    parsed = new URL(String(baseUrl));
  } catch {
    throw new TypeError(`baseUrl must be an absolute http(s) URL (got ${JSON.stringify(baseUrl)})`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new TypeError(`baseUrl must be an http(s) URL (got ${JSON.stringify(baseUrl)})`);
  }
  if (parsed.search || parsed.hash) throw new TypeError(`baseUrl must not have a query or fragment (got ${baseUrl})`);
  return parsed.href.replace(/\/+$/, '');
}

// setTimeout fires at once for delays above 2^31 - 1 ms (about 24.8 days): refuse them rather than time out at once.
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

function checkTimeout(value, name) {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > MAX_TIMEOUT_MS) {
    throw new TypeError(`${name} must be a number of milliseconds between 1 and ${MAX_TIMEOUT_MS} (got ${value})`);
  }
}

function lowerKeys(headers) {
  const out = {};
  if (!headers) return out;
  for (const [key, value] of Object.entries(headers)) if (value !== undefined) out[key.toLowerCase()] = String(value);
  return out;
}

// The module-level functions share one client configured from the environment (ML_MODEL_URL, ML_API_KEY),
// read at the first call rather than at import, so a dotenv loaded after the import still applies; it is rebuilt
// if those variables change.
let defaultClient;
let defaultKey;

function getDefaultClient() {
  const baseUrl = process.env.ML_MODEL_URL || DEFAULT_BASE_URL;
  const apiKey = process.env.ML_API_KEY || undefined;
  const key = `${baseUrl}\n${apiKey ?? ''}`;
  if (defaultClient === undefined || key !== defaultKey) {
    defaultClient = createClient({ baseUrl, apiKey, timeoutMs: DEFAULT_TIMEOUT_MS });
    defaultKey = key;
  }
  return defaultClient;
}

/** POST /predict with the default client (see createClient().predictMovieRating). */
export function predictMovieRating(features, options) {
  return getDefaultClient().predictMovieRating(features, options);
}

/** POST /predict-batch with the default client (see createClient().predictMultipleMovies). */
export function predictMultipleMovies(movies, options) {
  return getDefaultClient().predictMultipleMovies(movies, options);
}

/** GET /health with the default client. */
export function checkHealth(options) {
  return getDefaultClient().checkHealth(options);
}

/** POST /feedback with the default client (see createClient().sendFeedback). */
export function sendFeedback(feedback, options) {
  return getDefaultClient().sendFeedback(feedback, options);
}

export default { predictMovieRating, predictMultipleMovies, checkHealth, sendFeedback, createClient };
