// The retry policy as data, plus the two pure functions that apply it (backoff delay and Retry-After parsing).

/**
 * Default policy: up to 2 retries (3 attempts) on network errors and on the statuses below, with exponential
 * backoff and full jitter, never past the overall timeout. Pass `retries: 0` (or `{ limit: 0 }`) to turn off.
 */
export const DEFAULT_RETRY_POLICY = Object.freeze({
  /** Retries after the first attempt. */
  limit: 2,
  /** Statuses worth another try: request timeout, rate limited, and the server-side 5xx that are transient. */
  statusCodes: Object.freeze([408, 429, 500, 502, 503, 504]),
  /** Retry when the request got no HTTP answer at all (refused, reset, DNS...). */
  networkErrors: true,
  /** Before retry n (0-based), wait a uniform random time in [0, min(maxDelayMs, baseDelayMs * 2^n)]. */
  baseDelayMs: 300,
  maxDelayMs: 5000,
  /** Wait as long as the service's Retry-After says (still within the overall timeout). */
  respectRetryAfter: true,
});

/** Merge a user's `retries` option (a number or a partial policy) over the default policy. */
export function resolveRetryPolicy(retries, base = DEFAULT_RETRY_POLICY) {
  if (retries === undefined || retries === null) return base;
  if (typeof retries === 'number') {
    if (!Number.isInteger(retries) || retries < 0)
      throw new TypeError(`retries must be an integer >= 0 (got ${retries})`);
    return Object.freeze({ ...base, limit: retries });
  }
  if (typeof retries === 'object') {
    const merged = { ...base, ...retries };
    if (!Number.isInteger(merged.limit) || merged.limit < 0) {
      throw new TypeError(`retries.limit must be an integer >= 0 (got ${merged.limit})`);
    }
    merged.statusCodes = Object.freeze([...merged.statusCodes]);
    return Object.freeze(merged);
  }
  throw new TypeError(`retries must be a number or a policy object (got ${typeof retries})`);
}

/**
 * "Full jitter" backoff (uniform in [0, min(cap, base * 2^attempt)]): spreads the retries of many callers
 * hitting the same outage instead of having them all come back at the same instant.
 */
export function backoffDelay(policy, attempt, random = Math.random) {
  const ceiling = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** attempt);
  return Math.floor(random() * ceiling);
}

/**
 * Parse a Retry-After header value (delay seconds or an HTTP-date) into milliseconds from `now`;
 * undefined when absent or unparseable, 0 for dates in the past.
 */
export function parseRetryAfter(value, now = Date.now()) {
  if (value === null || value === undefined) return undefined;
  const text = String(value).trim();
  if (text === '') return undefined;
  if (/^\d+(\.\d+)?$/.test(text)) return Math.round(Number(text) * 1000);
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - now);
}
