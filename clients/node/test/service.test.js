// The client against the real Python service, started by this test on a free port.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import { promisify } from 'node:util';
import { HttpError, createClient } from '../mlModelService.js';
import { sampleFeatures, startService } from '../test-support/servers.js';

const SOURCES = ['model', 'fallback', 'personalized'];
let service;
let client;

before(async () => {
  service = await startService();
  client = createClient({ baseUrl: service.baseUrl });
});
after(() => service?.stop());

function movies() {
  return [
    { movie_id: 101, ...sampleFeatures({ vote_average: 8.6, vote_count: 25000, n_shared_genres: 3 }) },
    {
      movie_id: 'tt0002',
      ...sampleFeatures({ vote_average: 3.1, vote_count: 40, is_favorite_genre: 0, n_shared_genres: 0 }),
    },
    { movie_id: 103, ...sampleFeatures({ vote_average: 6.4, vote_count: 900, is_favorite_genre: false }) },
  ];
}

describe('predictions', () => {
  test('single prediction: the service JSON', async () => {
    const answer = await client.predictMovieRating(sampleFeatures(), { userId: 42, movieId: 7 });
    assert.deepEqual(Object.keys(answer).sort(), [
      'model_version',
      'predicted_rating',
      'prediction_id',
      'source',
      'variant',
    ]);
    assert.equal(answer.variant, 'champion');
    assert.ok(answer.predicted_rating >= 0 && answer.predicted_rating <= 10, String(answer.predicted_rating));
    assert.equal(answer.predicted_rating, Math.round(answer.predicted_rating * 1000) / 1000);
    assert.ok(SOURCES.includes(answer.source), answer.source);
    assert.equal(typeof answer.model_version, 'string');
    assert.match(answer.prediction_id, /^[0-9a-f]{32}$/);
  });

  test('batch in request order agrees with single predictions', async () => {
    const list = movies();
    const answer = await client.predictMultipleMovies(list);
    assert.equal(answer.count, 3);
    assert.equal(answer.ranked, false);
    assert.deepEqual(
      answer.predictions.map((p) => p.movie_id),
      [101, 'tt0002', 103],
    );
    const batchId = answer.predictions[0].prediction_id.replace(/-0$/, '');
    assert.deepEqual(
      answer.predictions.map((p) => p.prediction_id),
      [0, 1, 2].map((i) => `${batchId}-${i}`),
    );
    for (const [i, { movie_id: _, ...features }] of list.entries()) {
      const single = await client.predictMovieRating(features);
      assert.equal(answer.predictions[i].predicted_rating, single.predicted_rating);
    }
  });

  test('rank and topK: best first, cut to k', async () => {
    const ranked = await client.predictMultipleMovies(movies(), { rank: true, userId: 'u-1' });
    const ratings = ranked.predictions.map((p) => p.predicted_rating);
    assert.equal(ranked.ranked, true);
    assert.deepEqual(
      ratings,
      [...ratings].sort((a, b) => b - a),
    );
    const top = await client.predictMultipleMovies(movies(), { topK: 2 });
    assert.equal(top.count, 2);
    assert.equal(top.ranked, true);
    const pairs = (list) => list.map((p) => [p.movie_id, p.predicted_rating]);
    assert.deepEqual(pairs(top.predictions), pairs(ranked.predictions.slice(0, 2)));
  });
});

describe('errors from the service', () => {
  test('a 422 names the field, in the error and in its message', async () => {
    const error = await client.predictMovieRating(sampleFeatures({ vote_average: 11 })).catch((e) => e);
    assert.ok(error instanceof HttpError, String(error));
    assert.equal(error.status, 422);
    assert.equal(error.code, 'validation_error');
    assert.equal(error.field, 'vote_average');
    assert.equal(error.detail[0].value, 11);
    assert.equal(error.attempts, 1);
    assert.ok(
      error.message.startsWith(`POST ${service.baseUrl}/predict failed with HTTP 422 (validation_error: vote_average`),
      error.message,
    );
  });

  test('a batch 422 points at the movie', async () => {
    const list = movies();
    list[1].vote_average = -2;
    await assert.rejects(client.predictMultipleMovies(list), {
      name: 'HttpError',
      status: 422,
      field: 'movies[1].vote_average',
    });
    const noId = movies();
    delete noId[2].movie_id;
    await assert.rejects(client.predictMultipleMovies(noId), { status: 422, field: 'movies[2].movie_id' });
    await assert.rejects(client.predictMultipleMovies(movies(), { topK: 0 }), { status: 422, field: 'top_k' });
  });

  test('unknown fields are refused by name', async () => {
    const error = await client.predictMovieRating({ ...sampleFeatures(), genre: 'drama' }).catch((e) => e);
    assert.equal(error.status, 422);
    assert.equal(error.field, 'genre');
    assert.equal(error.detail[0].rule, 'unknown field');
  });

  test('the request id is sent and comes back on errors', async () => {
    const error = await client
      .predictMovieRating(sampleFeatures({ popularity: -1 }), { requestId: 'node-test-1' })
      .catch((e) => e);
    assert.equal(error.requestId, 'node-test-1');
    await assert.rejects(client.request('GET', '/no-such-route', { idempotent: true }), {
      status: 404,
      code: 'not_found',
    });
  });
});

test('checkHealth reports the model status', async () => {
  const health = await client.checkHealth();
  assert.ok(['ok', 'degraded'].includes(health.status));
  assert.ok(['model', 'fallback'].includes(health.source));
  assert.equal(typeof health.model_version, 'string');
  assert.equal(typeof health.uptime_seconds, 'number');
});

test('the module-level functions use ML_MODEL_URL', async () => {
  // A fresh process, so that the default client reads this environment and nothing else.
  const module = JSON.stringify(new URL('../mlModelService.js', import.meta.url).href);
  const script = `
    import { predictMovieRating, predictMultipleMovies, checkHealth } from ${module};
    const one = await predictMovieRating(${JSON.stringify(sampleFeatures())});
    const many = await predictMultipleMovies(${JSON.stringify(movies())}, { topK: 1 });
    const health = await checkHealth();
    console.log(JSON.stringify({ one, many, health }));
  `;
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], {
    env: { ...process.env, ML_MODEL_URL: service.baseUrl },
  });
  const { one, many, health } = JSON.parse(stdout);
  assert.equal(one.predicted_rating, (await client.predictMovieRating(sampleFeatures())).predicted_rating);
  assert.equal(many.count, 1);
  assert.ok(['ok', 'degraded'].includes(health.status));
});
