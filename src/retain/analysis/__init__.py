"""Analyses of models and data: token entropy × probability, confident conflicts."""
