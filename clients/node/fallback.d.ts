// Type declarations of fallback.js: the service's fallback rule, ported.

import type { BatchRequest, BatchResponse, Id, MovieFeatures, Prediction, PredictRequest } from './index.js';

export const PRIOR_MEAN: number;
export const PRIOR_VOTES: number;
export const FAVOURITE_BONUS: number;
export const SHARED_GENRE_BONUS: number;
export const MAX_SHARED_GENRES: number;
export const VERSION: string;
export const FEATURE_NAMES: readonly string[];
export function fallbackRating(features: MovieFeatures): number;
/** Python's round(x, 3), as the service rounds one prediction. */
export function round3(x: number): number;
/** numpy's np.round(x, 3), as the service rounds a batch. */
export function npRound3(x: number): number;
export function predictLocally(body: PredictRequest): Prediction;
export function predictBatchLocally(body: BatchRequest): BatchResponse;
export const LOCAL_SOURCE: 'fallback-local';
export const LOCAL_VARIANT: 'local';
export interface FeatureRule {
  readonly name: string;
  readonly kind: 'count' | 'flag' | 'number';
  readonly minimum: number;
  readonly maximum: number;
  readonly rule: string;
}
export const FEATURES: readonly FeatureRule[];
export function checkFeature(feature: FeatureRule, value: unknown, field: string): number;
export function checkId(value: unknown, field: string): Id;
export function checkFeatures(obj: unknown, loc?: string, allowed?: string[]): MovieFeatures;
