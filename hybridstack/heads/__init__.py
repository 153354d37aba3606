"""Estimators on features (logreg, lgbm, mlp) and the shared CV loop ``fit_oof``."""

from hybridstack.heads.base import FoldStore, OOFResult, SwapView, fit_oof

__all__ = ["FoldStore", "OOFResult", "SwapView", "fit_oof"]
