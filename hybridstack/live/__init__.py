"""Live front ends over a finished experiment.

* ``hybridstack ui <run_dir>``: a Streamlit page (:mod:`hybridstack.live.page`) to type a
  text (or a prompt and two responses), see each label's probability against its
  threshold, the explanation, the leaderboard and the report plots, and score a CSV.
* ``hybridstack serve <run_dir>``: a FastAPI app (:mod:`hybridstack.live.api`) with
  ``POST /predict``, ``POST /explain``, ``GET /health`` and ``GET /info``; concurrent
  requests are micro-batched into one predictor call (:mod:`hybridstack.live.batcher`).

Both are optional extras (``pip install 'hybridstack[ui]'``, ``'hybridstack[serve]'``):
streamlit, fastapi and uvicorn are imported only inside the functions that need them, so
``hybridstack --help`` works without them. Neither writes under the run folder or its
workdir: new embeddings go to ``--cache-dir`` (default: a temporary folder).
"""
