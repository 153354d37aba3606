"""Pipeline stages, each runnable alone: ``python -m hybridstack.stages.<name> -c cfg.toml``."""

# Run order of ``hybridstack run all``.
STAGE_ORDER = ("tfidf", "embed", "finetune", "stack")
