"""Fine-tuning of transformer classifiers (full or LoRA) over Hugging Face Accelerate.

- :mod:`~hybridstack.finetune.data`: rendering task fields into token ids (per-segment
  budgets, head+tail truncation), length-grouped batching and dynamic padding.
- :mod:`~hybridstack.finetune.model`: backbone/tokenizer loading, dropout override,
  optimizer groups, losses, mixed-precision choice.
- :mod:`~hybridstack.finetune.loop`: the per-fold training loop with early stopping.
- :mod:`~hybridstack.finetune.checkpoint`: atomic ``best/`` and resumable ``last/`` folders.
- :mod:`~hybridstack.finetune.launch`: multi-process (multi-GPU) launching.
- :mod:`~hybridstack.finetune.lora`: decoder backbones (Llama, Gemma-2, Qwen2, Mistral) and
  LoRA / QLoRA adapters (``finetune.method = "lora"``; peft imported lazily).

The stage that drives them over the folds is :mod:`hybridstack.stages.finetune`.
"""
