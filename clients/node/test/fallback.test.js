// The local fallback: the rule itself (hand-computed values), when the client uses it, and parity with the service.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  FEATURE_NAMES,
  LOCAL_SOURCE,
  VERSION,
  fallbackRating,
  predictBatchLocally,
  predictLocally,
  npRound3,
  round3,
} from '../fallback.js';
import { HttpError, NetworkError, ValidationError, createClient } from '../mlModelService.js';
import { deadUrl, sampleFeatures, sendJson, startService, startStub } from '../test-support/servers.js';

const FAST = { baseDelayMs: 1, maxDelayMs: 5 };

describe('the rule', () => {
  test('hand-computed values', () => {
    // base = (100 * 8.5 + 100 * 6.5) / 200 = 7.5; taste = 0.3 + 0.1 * min(5, 3) = 0.6
    assert.equal(
      round3(fallbackRating(sampleFeatures({ vote_count: 100, vote_average: 8.5, n_shared_genres: 5 }))),
      8.1,
    );
    // No votes: the prior mean alone; no taste.
    assert.equal(
      fallbackRating(sampleFeatures({ vote_count: 0, vote_average: 10, is_favorite_genre: 0, n_shared_genres: 0 })),
      6.5,
    );
    // base = (300 * 2 + 650) / 400 = 3.125; taste = 0.1 * 1
    assert.equal(
      round3(
        fallbackRating(
          sampleFeatures({ vote_count: 300, vote_average: 2, is_favorite_genre: false, n_shared_genres: 1 }),
        ),
      ),
      3.225,
    );
    // Clipped at 10: base ~ 10, taste 0.6.
    assert.equal(
      fallbackRating(
        sampleFeatures({ vote_count: 1e9, vote_average: 10, is_favorite_genre: true, n_shared_genres: 3 }),
      ),
      10,
    );
    // years_since_release and popularity do not enter the rule.
    const a = fallbackRating(sampleFeatures({ years_since_release: 0, popularity: 0 }));
    assert.equal(fallbackRating(sampleFeatures({ years_since_release: 150, popularity: 1e6 })), a);
  });

  test('rounding is Python round(x, 3) for one prediction and np.round(x, 3) for a batch', () => {
    assert.equal(round3(0.0625), 0.062); // exact tie, even neighbour below
    assert.equal(round3(0.1875), 0.188); // exact tie, even neighbour above
    assert.equal(round3(6.5625), 6.562);
    assert.equal(round3(1.0005), 1); // stored as 1.000499999..., not a tie
    assert.equal(round3(7.909090909090909), 7.909);
    // np.round multiplies first: 1.0005 * 1000 is exactly 1000.5 in float64, a tie, rounded to even.
    assert.equal(npRound3(1.0005), 1);
    assert.equal(npRound3(1.0015), 1.002);
    assert.equal(npRound3(7.909090909090909), 7.909);
    assert.equal(npRound3(0.0625), 0.062);
    // Where the two differ: 0.0025 is stored just above 0.0025, but 0.0025 * 1000 is exactly 2.5.
    assert.equal(round3(0.0025), 0.003);
    assert.equal(npRound3(0.0025), 0.002);
    assert.equal(round3(0.0055), 0.005);
    assert.equal(npRound3(0.0055), 0.006);
  });

  test('the local answer has the service shape, marked fallback-local', () => {
    const one = predictLocally(sampleFeatures({ vote_count: 100, vote_average: 8.5, n_shared_genres: 5 }));
    assert.deepEqual(Object.keys(one), ['predicted_rating', 'model_version', 'variant', 'source', 'prediction_id']);
    assert.equal(one.variant, 'local');
    assert.equal(one.predicted_rating, 8.1);
    assert.equal(one.model_version, VERSION);
    assert.equal(one.source, LOCAL_SOURCE);
    assert.match(one.prediction_id, /^[0-9a-f]{32}$/);

    const movies = [
      { movie_id: 10, ...sampleFeatures({ vote_count: 0, is_favorite_genre: 0, n_shared_genres: 0 }) }, // 6.5
      { movie_id: 11, ...sampleFeatures({ vote_count: 100, vote_average: 8.5, n_shared_genres: 5 }) }, // 8.1
      {
        movie_id: 12,
        ...sampleFeatures({ vote_count: 300, vote_average: 2, is_favorite_genre: 0, n_shared_genres: 1 }),
      }, // 3.225
    ];
    const plain = predictBatchLocally({ movies });
    assert.deepEqual(
      plain.predictions.map((p) => [p.movie_id, p.predicted_rating]),
      [
        [10, 6.5],
        [11, 8.1],
        [12, 3.225],
      ],
    );
    assert.equal(plain.count, 3);
    assert.equal(plain.ranked, false);
    const batchId = plain.predictions[0].prediction_id.split('-')[0];
    assert.deepEqual(
      plain.predictions.map((p) => p.prediction_id),
      [0, 1, 2].map((i) => `${batchId}-${i}`),
    );

    const top = predictBatchLocally({ movies, top_k: 2 });
    assert.deepEqual(
      top.predictions.map((p) => p.movie_id),
      [11, 10],
    );
    assert.equal(top.predictions[0].prediction_id.endsWith('-1'), true); // index in the request, not the rank
    assert.equal(top.count, 2);
    assert.equal(top.ranked, true);
    assert.deepEqual(
      predictBatchLocally({ movies, rank: true }).predictions.map((p) => p.movie_id),
      [11, 10, 12],
    );
  });

  test('local validation uses the service rules and field paths', () => {
    assert.throws(() => predictLocally(sampleFeatures({ vote_average: 11 })), {
      name: 'ValidationError',
      field: 'vote_average',
      rule: 'must be a finite number between 0 and 10',
    });
    assert.throws(() => predictLocally(sampleFeatures({ n_shared_genres: 1.5 })), { field: 'n_shared_genres' });
    assert.throws(() => predictLocally(sampleFeatures({ is_favorite_genre: 2 })), { field: 'is_favorite_genre' });
    assert.throws(() => predictLocally(sampleFeatures({ popularity: true })), { field: 'popularity' });
    assert.throws(() => predictLocally({ ...sampleFeatures(), genre: 'x' }), { field: 'genre', rule: 'unknown field' });
    const { vote_count: _, ...missing } = sampleFeatures();
    assert.throws(() => predictLocally(missing), {
      field: 'vote_count',
      rule: 'is required',
      message: 'vote_count: is required',
      detail: [{ field: 'vote_count', rule: 'is required' }],
    });
    const movies = [
      { movie_id: 1, ...sampleFeatures() },
      { movie_id: 2, ...sampleFeatures({ vote_average: -1 }) },
    ];
    assert.throws(() => predictBatchLocally({ movies }), { field: 'movies[1].vote_average' });
    assert.throws(() => predictBatchLocally({ movies: [sampleFeatures()] }), { field: 'movies[0].movie_id' });
    assert.throws(() => predictBatchLocally({ movies: [] }), { field: 'movies' });
  });
});

describe('when the client falls back', () => {
  test('nothing listening: single and batch answered locally, with the error reported to onFallback', async () => {
    const seen = [];
    const client = createClient({
      baseUrl: await deadUrl(),
      fallback: true,
      retries: FAST,
      onFallback: (error) => seen.push(error),
    });
    const one = await client.predictMovieRating(
      sampleFeatures({ vote_count: 100, vote_average: 8.5, n_shared_genres: 5 }),
    );
    assert.equal(one.source, 'fallback-local');
    assert.equal(one.predicted_rating, 8.1);
    const batch = await client.predictMultipleMovies(
      [{ movie_id: 7, ...sampleFeatures({ vote_count: 0, is_favorite_genre: 0, n_shared_genres: 0 }) }],
      { topK: 1 },
    );
    assert.deepEqual(
      batch.predictions.map((p) => [p.movie_id, p.predicted_rating, p.source]),
      [[7, 6.5, 'fallback-local']],
    );
    assert.equal(seen.length, 2);
    assert.ok(seen.every((e) => e instanceof NetworkError && e.attempts === 3));
  });

  test('fallback is opt-in: without it the NetworkError is thrown; it can be enabled per call', async () => {
    const client = createClient({ baseUrl: await deadUrl(), retries: 0 });
    await assert.rejects(client.predictMovieRating(sampleFeatures()), NetworkError);
    const answer = await client.predictMovieRating(sampleFeatures(), { fallback: true });
    assert.equal(answer.source, 'fallback-local');
  });

  test('5xx after the retries falls back; 4xx never does', async (t) => {
    const stub = await startStub((req, res, n) =>
      req.url === '/predict'
        ? sendJson(res, 500, { error: 'internal_error', message: 'boom' })
        : sendJson(res, 422, {
            error: 'validation_error',
            message: 'movies[0].vote_average: must be a finite number between 0 and 10 (got 11)',
            detail: [{ field: 'movies[0].vote_average', rule: 'must be a finite number between 0 and 10', value: 11 }],
          }),
    );
    t.after(stub.close);
    const client = createClient({ baseUrl: stub.baseUrl, fallback: true, retries: FAST });
    assert.equal((await client.predictMovieRating(sampleFeatures())).source, 'fallback-local');
    assert.equal(stub.requests.length, 3);
    await assert.rejects(client.predictMultipleMovies([{ movie_id: 1, ...sampleFeatures() }]), {
      name: 'HttpError',
      status: 422,
      field: 'movies[0].vote_average',
    });
  });

  test('invalid input while the service is down: a local ValidationError, caused by the network error', async () => {
    const client = createClient({ baseUrl: await deadUrl(), fallback: true, retries: 0 });
    const error = await client.predictMovieRating(sampleFeatures({ vote_average: 11 })).catch((e) => e);
    assert.ok(error instanceof ValidationError, String(error));
    assert.equal(error.field, 'vote_average');
    assert.ok(error.cause instanceof NetworkError);
  });
});

// Varied inputs covering every branch of the rule: no votes, few, many; flag as number and boolean; shared genres
// under, at and over the cap; extremes that clip at 0 and 10; non-integer averages.
function variedInputs() {
  const rows = [
    [0, 0, 0, 0],
    [0, 10, 0, 1],
    [1, 5.55, 101, 1],
    [2, 8.9, 7, true],
    [3, 0.1, 1e9, false],
    [4, 6.5, 100, 0],
    [30, 10, 1, 1],
    [0, 3.3, 2500, true],
    [1, 7.25, 99, false],
    [2, 0, 1, 0],
    [3, 10, 1e9, 1],
    [5, 9.99, 123456, true],
    [0, 0, 1e9, 0],
    [2, 4.4, 33, 1],
  ];
  return rows.map(([shared, average, count, favourite], i) => ({
    n_shared_genres: shared,
    vote_average: average,
    vote_count: count,
    is_favorite_genre: favourite,
    years_since_release: (i * 11.5) % 150,
    popularity: i * 41.5,
  }));
}

// Inputs whose exact rating lies 1e-7 below or above a rounding boundary (x.xxx5), found by solving the rule for
// vote_average: if a constant drift moves the rating by more than 1e-7, the 3-decimal answers stop matching.
// Without these, a small drift (0.1 -> 0.1001) hides behind the rounding.
function boundaryInputs() {
  const rows = [];
  const cases = [
    [150, 1, 2, 7.1235],
    [40, 0, 0, 5.4445],
    [1000, 1, 3, 8.0005],
    [7, 0, 1, 6.2225],
    [2500, 1, 1, 3.9995],
    // A low average with 100 votes makes the rating move with PRIOR_VOTES; 5 shared genres make it move with the cap.
    [100, 0, 0, 3.2505],
    [500, 1, 5, 7.7775],
  ];
  for (const [count, favourite, shared, boundary] of cases) {
    for (const offset of [-1e-7, 1e-7]) {
      const taste = 0.3 * favourite + 0.1 * Math.min(shared, 3);
      const average = ((boundary + offset - taste) * (count + 100) - 6.5 * 100) / count;
      rows.push({
        n_shared_genres: shared,
        vote_average: average,
        vote_count: count,
        is_favorite_genre: favourite,
        years_since_release: 10,
        popularity: 5,
      });
    }
  }
  return rows;
}

function parityInputs() {
  return [...variedInputs(), ...boundaryInputs()];
}

test('boundary inputs are valid and sit next to a rounding boundary', () => {
  for (const x of boundaryInputs()) {
    assert.ok(x.vote_average >= 0 && x.vote_average <= 10, JSON.stringify(x));
    const thousandths = fallbackRating(x) * 1000;
    const gap = Math.abs(thousandths - Math.floor(thousandths) - 0.5);
    assert.ok(gap > 1e-5 && gap < 2e-4, `${JSON.stringify(x)}: ${gap}`);
  }
});

describe('parity with the service', () => {
  let service;
  before(async () => {
    // A model path that does not exist (relative to the service's temporary working directory): the service
    // starts degraded and answers with its fallback rule.
    service = await startService({ env: { MODEL_PATH: 'no-such-model-dir' } });
  });
  after(() => service?.stop());

  test('the service is in fallback mode', async () => {
    const health = await createClient({ baseUrl: service.baseUrl }).checkHealth();
    assert.equal(health.status, 'degraded');
    assert.equal(health.source, 'fallback');
  });

  test('same numbers as the service, one by one and in a batch', async () => {
    const client = createClient({ baseUrl: service.baseUrl });
    const inputs = parityInputs();
    assert.equal(new Set(inputs.map((x) => JSON.stringify(x))).size, inputs.length, 'inputs repeat');
    for (const features of inputs) {
      const remote = await client.predictMovieRating(features);
      assert.equal(remote.source, 'fallback');
      assert.equal(remote.model_version, VERSION);
      assert.equal(remote.predicted_rating, predictLocally(features).predicted_rating, JSON.stringify(features));
    }
    const movies = inputs.map((x, i) => ({ movie_id: i, ...x }));
    const remote = await client.predictMultipleMovies(movies);
    const local = predictBatchLocally({ movies });
    assert.deepEqual(
      remote.predictions.map((p) => [p.movie_id, p.predicted_rating]),
      local.predictions.map((p) => [p.movie_id, p.predicted_rating]),
    );
  });

  test('same validation rules: what the local rule refuses, the service refuses on the same field', async () => {
    const client = createClient({ baseUrl: service.baseUrl });
    const bad = [
      { vote_average: 10.5 },
      { n_shared_genres: 31 },
      { n_shared_genres: 2.5 },
      { vote_count: -1 },
      { is_favorite_genre: 2 },
      { years_since_release: 151 },
      { popularity: -0.1 },
      { popularity: true },
      { vote_average: null },
      { vote_average: '7.5' },
      { vote_count: 1e9 + 1 },
      { is_favorite_genre: 'yes' },
      { vote_count: undefined }, // missing
      { genre_ids: [18] }, // unknown
    ];
    for (const change of bad) {
      const features = sampleFeatures(change);
      const local = (() => {
        try {
          predictLocally(features);
        } catch (e) {
          return e;
        }
        return null;
      })();
      const remote = await client.predictMovieRating(features).catch((e) => e);
      assert.ok(local instanceof ValidationError, JSON.stringify(change));
      assert.ok(remote instanceof HttpError && remote.status === 422, `${JSON.stringify(change)}: ${remote}`);
      assert.equal(remote.field, local.field);
      assert.equal(remote.detail[0].rule, local.rule);
    }
  });
});

test('FEATURE_NAMES are the six features in the service order', () => {
  assert.deepEqual(
    [...FEATURE_NAMES],
    ['n_shared_genres', 'vote_average', 'vote_count', 'is_favorite_genre', 'years_since_release', 'popularity'],
  );
});
