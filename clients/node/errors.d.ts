// Type declarations of errors.js: the client's error classes.

export class MlServiceError extends Error {
  readonly method: string;
  readonly url: string;
  /** HTTP attempts made before giving up. */
  readonly attempts: number;
}

/** A non-2xx answer, with the service's error body. */
export class HttpError extends MlServiceError {
  readonly name: 'HttpError';
  readonly status: number;
  readonly statusText: string;
  /** The service's error code: validation_error, not_ready, not_found... */
  readonly code: string | undefined;
  readonly serviceMessage: string | undefined;
  readonly detail: Array<{ field: string; rule: string; value: unknown }>;
  readonly body: unknown;
  readonly requestId: string | undefined;
  /** detail[0].field: the first offending field of a 422. */
  readonly field: string | undefined;
}

export class TimeoutError extends MlServiceError {
  readonly name: 'TimeoutError';
  readonly timeoutMs: number;
}

export class NetworkError extends MlServiceError {
  readonly name: 'NetworkError';
  /** ECONNREFUSED, ECONNRESET, ENOTFOUND... when known. */
  readonly code: string | undefined;
}

/** The local fallback refused the input (thrown only when it answers in the service's place). */
export class ValidationError extends MlServiceError {
  readonly name: 'ValidationError';
  readonly field: string;
  readonly rule: string;
  readonly value: unknown;
  readonly detail: Array<{ field: string; rule: string; value: unknown }>;
}
