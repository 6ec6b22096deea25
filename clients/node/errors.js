// The client's error classes: every failure says which request (method + URL) failed and why.

/** Base class of every error the client throws on purpose; `method` and `url` name the failed request. */
export class MlServiceError extends Error {
  constructor(message, { method, url, attempts = 1, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'MlServiceError';
    this.method = method;
    this.url = url;
    // How many HTTP attempts were made before giving up (1 when no retry happened).
    this.attempts = attempts;
  }
}

/**
 * The service answered with a non-2xx status. Carries the service's JSON error body
 * (`{"error", "message", "detail"?}`), so a 422 names the offending field.
 */
export class HttpError extends MlServiceError {
  constructor({ method, url, status, statusText = '', body, headers, attempts = 1 }) {
    const parsed = body !== null && typeof body === 'object' ? body : {};
    const code = typeof parsed.error === 'string' ? parsed.error : undefined;
    const serviceMessage = typeof parsed.message === 'string' ? parsed.message : undefined;
    let reason = serviceMessage ?? (plainText(body) || statusText);
    if (code) reason = reason ? `${code}: ${reason}` : code;
    super(`${method} ${url} failed with HTTP ${status}${reason ? ` (${reason})` : ''}`, { method, url, attempts });
    this.name = 'HttpError';
    this.status = status;
    this.statusText = statusText;
    /** The service's error code (`validation_error`, `not_ready`...), when it sent one. */
    this.code = code;
    /** The service's human message, e.g. `movies[3].vote_average: must be ... (got 11)`. */
    this.serviceMessage = serviceMessage;
    /** Per-field problems of a 422: `[{ field, rule, value }]`; empty otherwise. */
    this.detail = Array.isArray(parsed.detail) ? parsed.detail : [];
    /** The response body: parsed JSON when it was JSON, else the raw text. */
    this.body = body;
    this.requestId = headers?.get?.('x-request-id') ?? undefined;
  }

  /** The first offending field of a validation error (`vote_average`, `movies[3].vote_average`...), if any. */
  get field() {
    return this.detail[0]?.field;
  }
}

/** The overall time budget (`timeoutMs`, retries and waits included) ran out before an answer arrived. */
export class TimeoutError extends MlServiceError {
  constructor({ method, url, timeoutMs, attempts = 1, cause }) {
    super(`${method} ${url} timed out after ${timeoutMs} ms (${plural(attempts, 'attempt')})`, {
      method,
      url,
      attempts,
      cause,
    });
    this.name = 'TimeoutError';
    this.timeoutMs = timeoutMs;
  }
}

/** The request never got an HTTP answer: connection refused or reset, DNS failure, malformed response... */
export class NetworkError extends MlServiceError {
  constructor({ method, url, cause, attempts = 1 }) {
    super(`${method} ${url} failed: ${describeCause(cause)} (${plural(attempts, 'attempt')})`, {
      method,
      url,
      attempts,
      cause,
    });
    this.name = 'NetworkError';
    /** The low-level code when there is one (`ECONNREFUSED`, `ECONNRESET`, `ENOTFOUND`...). */
    this.code = findCode(cause);
  }
}

/** Local input check of the fallback rule failed (only thrown when the fallback answers instead of the service). */
export class ValidationError extends MlServiceError {
  constructor({ field, rule, value, method, url }) {
    // A missing field (value undefined) has no value to show, as in the service's 422.
    super(value === undefined ? `${field}: ${rule}` : `${field}: ${rule} (got ${safeJson(value)})`, { method, url });
    this.name = 'ValidationError';
    this.field = field;
    this.rule = rule;
    this.value = value;
    // Same shape as the service's 422 detail, so callers handle both alike.
    this.detail = [value === undefined ? { field, rule } : { field, rule, value }];
  }
}

// undici's fetch rejects with a bare TypeError("fetch failed") whose `cause` holds the real reason
// (ECONNREFUSED, ECONNRESET, "other side closed"...): dig it out so the message says something useful.
function describeCause(cause) {
  const parts = [];
  let current = cause;
  for (let depth = 0; current && depth < 4; depth += 1) {
    const text = current.message || current.code || String(current);
    if (text && !parts.includes(text) && text !== 'fetch failed') parts.push(text);
    current = current.cause;
  }
  return parts.join(': ') || 'network error';
}

function findCode(cause) {
  let current = cause;
  for (let depth = 0; current && depth < 4; depth += 1) {
    if (typeof current.code === 'string') return current.code;
    current = current.cause;
  }
  return undefined;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

// A non-JSON error body (a proxy's or platform's page) is quoted only when it is short plain text: an HTML page
// would bury the status in markup.
function plainText(body) {
  if (typeof body !== 'string') return '';
  const text = body.trim();
  if (text === '' || text.startsWith('<')) return '';
  return truncate(text.split('\n', 1)[0], 200);
}

function truncate(text, n) {
  return text.length <= n ? text : `${text.slice(0, n - 3)}...`;
}

function safeJson(value) {
  try {
    return value === undefined ? 'nothing' : truncate(JSON.stringify(value), 80);
  } catch {
    return String(value);
  }
}
