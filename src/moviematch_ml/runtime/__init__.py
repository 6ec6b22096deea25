"""Inference only: model files and cards, the tree evaluator, both models' predictors. No pandas, no training."""
