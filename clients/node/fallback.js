// The service's fallback rule, ported as-is: the client answers with it when the service cannot be reached.
//
//   base   = (vote_count * vote_average + PRIOR_VOTES * PRIOR_MEAN) / (vote_count + PRIOR_VOTES)
//   taste  = FAVOURITE_BONUS * is_favorite_genre + SHARED_GENRE_BONUS * min(n_shared_genres, MAX_SHARED_GENRES)
//   rating = clip(base + taste, 0, 10)
//
// The source of truth is src/moviematch_ml/runtime/fallback.py in the service; test/fallback.test.js starts the real
// service in fallback mode and checks that both give the same numbers, so the two cannot drift apart silently.

import { randomUUID } from 'node:crypto';
import { ValidationError } from './errors.js';

export const PRIOR_MEAN = 6.5;
export const PRIOR_VOTES = 100.0;
export const FAVOURITE_BONUS = 0.3;
export const SHARED_GENRE_BONUS = 0.1;
export const MAX_SHARED_GENRES = 3.0;
/** `model_version` of answers made by the rule (the service reports the same string). */
export const VERSION = 'fallback-1';
/** `source` of answers made by this client's copy of the rule (the service's own says "fallback"). */
export const LOCAL_SOURCE = 'fallback-local';
/** `variant` of answers made by the rule here: no variant of the service answered. */
export const LOCAL_VARIANT = 'local';

/** The six features and their rules, as in the service's features.py (same order, same ranges, same words). */
export const FEATURES = Object.freeze([
  feature('n_shared_genres', 'count', 0, 30),
  feature('vote_average', 'number', 0, 10),
  feature('vote_count', 'count', 0, 1e9),
  feature('is_favorite_genre', 'flag', 0, 1),
  feature('years_since_release', 'number', 0, 150),
  feature('popularity', 'number', 0, 1e6),
]);
export const FEATURE_NAMES = Object.freeze(FEATURES.map((f) => f.name));

const MAX_ID_LENGTH = 128;
const ID_RULE = `must be a non-negative integer or a string of 1-${MAX_ID_LENGTH} printable characters`;
const MAX_INT64 = 2n ** 63n - 1n;
// Python's str.isprintable(): no control, format, surrogate, private-use or unassigned characters and no
// separators other than the plain space.
const PRINTABLE = /^(?:[^\p{C}\p{Z}]| )+$/u;

function feature(name, kind, minimum, maximum) {
  let rule;
  if (kind === 'flag') rule = 'must be 0, 1, true or false';
  else if (kind === 'count') rule = `must be an integer between ${minimum} and ${maximum}`;
  else rule = `must be a finite number between ${minimum} and ${maximum}`;
  return Object.freeze({ name, kind, minimum, maximum, rule });
}

/**
 * The rule itself, on already-valid features (flags may be booleans); returns the unrounded 0-10 rating.
 * The operations run in the same order as the service's numpy code, so the float64 results are identical.
 */
export function fallbackRating(features) {
  const count = Number(features.vote_count);
  const average = Number(features.vote_average);
  const favourite = Number(features.is_favorite_genre);
  const shared = Number(features.n_shared_genres);
  const base = (count * average + PRIOR_VOTES * PRIOR_MEAN) / (count + PRIOR_VOTES);
  const taste = FAVOURITE_BONUS * favourite + SHARED_GENRE_BONUS * Math.min(shared, MAX_SHARED_GENRES);
  return Math.min(Math.max(base + taste, 0.0), 10.0);
}

/**
 * Round to 3 decimals exactly as Python's round(x, 3) does: on the exact binary value, ties to even.
 * Math.round(x * 1000) / 1000 would differ on values such as 1.0005 (stored as 1.000499999...).
 */
export function round3(x) {
  if (!Number.isFinite(x)) return x;
  // toFixed rounds the exact binary value correctly, but breaks exact ties upwards; exact ties are the doubles
  // equal to an odd multiple of 0.0005, which must be dyadic, i.e. odd multiples of 0.0625.
  const twice = x * 2000;
  if (Number.isInteger(twice) && twice % 2 !== 0 && twice % 125 === 0 && twice / 2000 === x) {
    const low = (twice - 1) / 2;
    const even = low % 2 === 0 ? low : low + 1;
    return even / 1000;
  }
  return Number(x.toFixed(3));
}

/**
 * Round to 3 decimals exactly as numpy's np.round(x, 3) does (the service's batch route): rint(x * 1000) / 1000,
 * ties to even on the product. It differs from round3 only within ~1e-13 of a tie.
 */
export function npRound3(x) {
  if (!Number.isFinite(x)) return x;
  const y = x * 1000;
  const floor = Math.floor(y);
  const diff = y - floor;
  let r;
  if (diff > 0.5) r = floor + 1;
  else if (diff < 0.5) r = floor;
  else r = floor % 2 === 0 ? floor : floor + 1;
  return r / 1000;
}

/** Check one feature value against its rule, like the service's parse_value; throws ValidationError. */
export function checkFeature(f, value, field) {
  if (typeof value === 'boolean') {
    if (f.kind === 'flag') return value ? 1 : 0;
    throw new ValidationError({ field, rule: f.rule, value });
  }
  if (typeof value !== 'number' || !Number.isFinite(value)) throw new ValidationError({ field, rule: f.rule, value });
  if (f.kind !== 'number' && !Number.isInteger(value)) throw new ValidationError({ field, rule: f.rule, value });
  if (f.kind === 'flag' ? value !== 0 && value !== 1 : !(f.minimum <= value && value <= f.maximum)) {
    throw new ValidationError({ field, rule: f.rule, value });
  }
  return value;
}

/** Check a user or movie identifier like the service's parse_id; throws ValidationError. */
export function checkId(value, field) {
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0 && BigInt(value) <= MAX_INT64) return value;
  if (typeof value === 'string' && value.length > 0 && [...value].length <= MAX_ID_LENGTH && PRINTABLE.test(value)) {
    return value;
  }
  throw new ValidationError({ field, rule: ID_RULE, value });
}

/** Validate one object holding the six features (plus `allowed` extra keys); returns them as numbers. */
export function checkFeatures(obj, loc = '', allowed = []) {
  if (obj === null || typeof obj !== 'object' || Array.isArray(obj)) {
    throw new ValidationError({ field: loc || 'body', rule: 'must be a JSON object', value: obj });
  }
  const prefix = loc ? `${loc}.` : '';
  const out = {};
  for (const f of FEATURES) {
    if (!(f.name in obj) || obj[f.name] === undefined) {
      throw new ValidationError({ field: prefix + f.name, rule: 'is required' });
    }
    out[f.name] = checkFeature(f, obj[f.name], prefix + f.name);
  }
  for (const key of Object.keys(obj)) {
    // undefined values vanish in JSON.stringify, so the service never sees them either.
    if (obj[key] !== undefined && !FEATURE_NAMES.includes(key) && !allowed.includes(key)) {
      throw new ValidationError({ field: prefix + key, rule: 'unknown field', value: obj[key] });
    }
  }
  return out;
}

function newId() {
  return randomUUID().replaceAll('-', '');
}

/**
 * Answer a POST /predict body with the rule: same shape as the service's answer, `source: "fallback-local"`.
 * The prediction_id is generated here, so the service has never seen it.
 */
export function predictLocally(body) {
  const features = checkFeatures(body, '', ['user_id', 'movie_id']);
  if (body.user_id !== undefined) checkId(body.user_id, 'user_id');
  if (body.movie_id !== undefined) checkId(body.movie_id, 'movie_id');
  return {
    predicted_rating: round3(fallbackRating(features)),
    model_version: VERSION,
    variant: LOCAL_VARIANT,
    source: LOCAL_SOURCE,
    prediction_id: newId(),
  };
}

/** Answer a POST /predict-batch body with the rule, ranking and cutting like the service does. */
export function predictBatchLocally(body) {
  const { movies, user_id: userId, rank, top_k: topK } = body ?? {};
  if (!Array.isArray(movies) || movies.length === 0) {
    throw new ValidationError({ field: 'movies', rule: 'must be a non-empty list of movies', value: movies });
  }
  if (userId !== undefined) checkId(userId, 'user_id');
  if (rank !== undefined && typeof rank !== 'boolean') {
    throw new ValidationError({ field: 'rank', rule: 'must be true or false', value: rank });
  }
  if (topK !== undefined && topK !== null && !(Number.isInteger(topK) && topK >= 1)) {
    throw new ValidationError({ field: 'top_k', rule: 'must be an integer >= 1', value: topK });
  }
  const batchId = newId();
  const rows = movies.map((movie, index) => {
    const loc = `movies[${index}]`;
    const features = checkFeatures(movie, loc, ['movie_id']);
    if (movie.movie_id === undefined)
      throw new ValidationError({ field: `${loc}.movie_id`, rule: 'is required' });
    const movieId = checkId(movie.movie_id, `${loc}.movie_id`);
    // The service rounds a batch with np.round (and a single prediction with Python's round): copy each exactly.
    return { index, movieId, rating: npRound3(fallbackRating(features)) };
  });
  const ranked = Boolean(rank) || (topK !== undefined && topK !== null);
  let ordered = rows;
  if (ranked) {
    // Best first on the rounded ratings, as the service does; equal ratings keep request order (the sort is stable).
    ordered = [...rows].sort((a, b) => b.rating - a.rating);
    if (topK !== undefined && topK !== null) ordered = ordered.slice(0, topK);
  }
  const predictions = ordered.map((r) => ({
    movie_id: r.movieId,
    predicted_rating: r.rating,
    source: LOCAL_SOURCE,
    prediction_id: `${batchId}-${r.index}`,
  }));
  return { predictions, model_version: VERSION, variant: LOCAL_VARIANT, count: predictions.length, ranked };
}
