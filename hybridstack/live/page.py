"""The ``hybridstack ui`` page (a Streamlit script; ``hybridstack ui`` runs it).

    streamlit run page.py -- RUN_DIR [--labels test_labels.csv] [--cache-dir DIR]

Tabs: *Predict* (a text box per text column, or a prompt and two responses; each label's
probability as a bar against its threshold, the labels given, and why: TF-IDF n-grams
highlighted in the text, the embedding heads' feature contributions, the stack's model
shares), *Score a CSV* (chunked, with a progress bar and a download of the
``hybridstack predict --input --output`` columns) and *Leaderboard* (each model's CV, the
held-out score with ``--labels``, the report plots).

The predictor loads once per process (``st.cache_resource``), not per interaction, and
one lock keeps two sessions from using it at once. Nothing is written under the run
folder or its workdir: new embeddings go to ``--cache-dir`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import html
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from hybridstack.errors import HybridstackError, one_line
from hybridstack.live import core

UPLOAD_TYPES = ["csv", "tsv", "txt", "gz", "zip"]
FIRE_COLOUR = "#d9480f"
BAR_COLOUR = "#4c6ef5"


def page_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="page.py")
    parser.add_argument("run_dir")
    parser.add_argument("--labels")
    parser.add_argument("--cache-dir")
    return parser.parse_args(argv)


@st.cache_resource(show_spinner="Loading the experiment's models (once per process)...")
def get_predictor(run_dir: str, cache_dir: str | None):
    return core.tune_for_serving(core.load_predictor(run_dir, cache_dir))  # no log bars


@st.cache_resource
def predictor_lock(run_dir: str) -> threading.Lock:
    return threading.Lock()


@st.cache_data(show_spinner="Reading the scores...")
def get_leaderboard(run_dir: str, labels: str | None) -> tuple[list[dict[str, Any]], str | None]:
    """The leaderboard and, when the held-out scores cannot be computed, why (both cached)."""
    try:
        return core.leaderboard(run_dir, labels), None
    except HybridstackError as err:
        if labels is None:
            raise
        return core.leaderboard(run_dir, None), f"No held-out scores: {one_line(err)}"


# -- pieces ------------------------------------------------------------------------------------


_GRID = ('display:grid; grid-template-columns:max-content 1fr max-content; gap:5px 12px; '
         'align-items:center; margin-bottom:0.8rem')
_TRACK = 'position:relative; height:14px; background:#e9ecef; border-radius:3px'
_NUMBER = 'font-family:monospace; white-space:nowrap'


def probability_bars(probabilities: dict[str, float], thresholds: dict[str, float] | None,
                     given: list[str]) -> str:
    """HTML: per label a bar of its probability, a black tick at its threshold, the numbers."""
    cells = [f'<div style="color:#868e96; font-size:0.8em">{text}</div>' for text in (
        "label", "probability" + (" (tick: threshold)" if thresholds is not None else ""),
        "p / threshold" if thresholds is not None else "p")]
    for name, p in probabilities.items():
        fired = name in given
        tick = cut_text = ""
        if thresholds is not None:
            t = thresholds[name]
            tick = (f'<div style="position:absolute; left:{100 * t:.1f}%; top:-3px; bottom:-3px; '
                    f'width:2px; background:#212529" title="threshold {t:.3f}"></div>')
            cut_text = f" / {t:.3f}"
        colour = FIRE_COLOUR if fired else BAR_COLOUR
        cells += [
            f'<div style="font-weight:{700 if fired else 400}">{html.escape(name)}</div>',
            f'<div style="{_TRACK}"><div style="width:{100 * p:.1f}%; height:100%; '
            f'background:{colour}; border-radius:3px"></div>{tick}</div>',
            f'<div style="{_NUMBER}">{p:.3f}{cut_text}{" &#10004;" if fired else ""}</div>']
    return f'<div style="{_GRID}">' + "".join(cells) + "</div>"


def share_bars(shares: dict[str, float]) -> str:
    """HTML: each base model's share in the stack as a grey bar."""
    cells = []
    for name, share in shares.items():
        width = 100 * max(min(share, 1.0), 0.0)
        cells += [f"<div>{html.escape(name)}</div>",
                  f'<div style="{_TRACK}; height:12px"><div style="width:{width:.1f}%; '
                  f'height:100%; background:#868e96; border-radius:3px"></div></div>',
                  f'<div style="{_NUMBER}">{share:.2f}</div>']
    return f'<div style="{_GRID}">' + "".join(cells) + "</div>"


def show_result(predictor, explained: dict[str, Any], typed: dict[str, str]) -> None:
    """The labels and bars (left), the stack's shares and the highlighted text (right), then
    the n-gram and feature-contribution tables."""
    names = explained["labels"]
    left, right = st.columns(2, gap="large")
    with left:
        if predictor.multilabel:
            if names:
                st.success(f"Labels: {', '.join(names)}")
            else:
                st.info("Labels: none (no label reaches its threshold)")
        else:
            st.success(f"Label: {names[0]}")
        st.markdown(probability_bars(explained["probabilities"], core.thresholds_of(predictor),
                                     names), unsafe_allow_html=True)
        if predictor.multilabel:
            st.caption("Bar: the stack's probability; black tick: the label's tuned threshold "
                       "(stack/thresholds.json). A label is given at or over its threshold.")
        else:
            st.caption("The label given is the most probable one.")

    weights = core.ngram_weights(predictor.task, explained)
    ngrams, features = core.contribution_rows(explained)
    with right:
        st.markdown("#### Why")
        stack = explained["stack"]
        st.markdown(f"**Stack** `{stack['method']}` ({stack['kind']}): each base model's share")
        st.markdown(share_bars(stack["shares"]), unsafe_allow_html=True)
        if ngrams:
            st.markdown("**TF-IDF n-grams** that pushed the labels given (darker: more)")
            for column in predictor.task.text_columns():
                text = typed.get(column, "")
                if not text:
                    continue
                label = column if len(predictor.task.text_columns()) > 1 else "text"
                st.markdown(f'<div style="border:1px solid #dee2e6; border-radius:6px; '
                            f'padding:8px 12px; margin-bottom:8px; line-height:1.7">'
                            f'<span style="color:#868e96; font-size:0.8em">'
                            f'{html.escape(label)}</span><br>'
                            f'{core.highlight_html(text, weights.get(column, {}))}</div>',
                            unsafe_allow_html=True)
        explained_models = set(explained["models"])
        others = [m.name for m in predictor.base_models if m.name not in explained_models]
        if others:
            st.caption(f"{', '.join(others)}: no finer explanation (MLP heads, fine-tuned "
                       "transformers); the stack's share shows their weight.")

    tables = [(title, rows) for title, rows in (
        ("TF-IDF n-grams per label (contribution to the logit)", ngrams),
        ("Embedding heads (LightGBM): feature contributions per label, in log-odds", features))
        if rows]
    for column, (title, rows) in zip(st.columns(max(len(tables), 1), gap="large"), tables):
        with column:
            frame = pd.DataFrame(rows)
            if frame["model"].nunique() == 1:  # one model: name it in the title
                title = f"{title}: {frame['model'].iloc[0]}"
                frame = frame.drop(columns=["model"])
            if "field" in frame and len(predictor.task.text_columns()) == 1:
                frame = frame.drop(columns=["field"])
            frame["contribution"] = frame["contribution"].round(3)
            st.markdown(f"**{title}**")
            st.dataframe(frame, hide_index=True, width="stretch",
                         height=min(38 + 35 * len(frame), 290))


# -- tabs ----------------------------------------------------------------------------------------


def predict_tab(predictor, lock: threading.Lock) -> None:
    task = predictor.task
    columns = task.text_columns()
    with st.form("predict"):
        if task.kind == "pairwise":
            prompt = st.text_area("Prompt", height=90)
            left, right = st.columns(2)
            a = left.text_area("Response A", height=160)
            b = right.text_area("Response B", height=160)
            typed = dict(zip(columns, (prompt, a, b)))
        else:
            typed = {column: st.text_area("Text" if len(columns) == 1 else column, height=110)
                     for column in columns}
        submitted = st.form_submit_button("Predict", type="primary")
    if submitted:
        if not any(text.strip() for text in typed.values()):
            st.warning("Type a text first.")
            return
        row = (core.pair_row(task, *typed.values()) if task.kind == "pairwise"
               else core.text_row(task, typed))
        try:
            with lock:
                explained = predictor.explain([row])[0]
        except HybridstackError as err:
            st.error(one_line(err))
            return
        st.session_state["result"] = (typed, explained)
    if "result" in st.session_state:
        typed, explained = st.session_state["result"]
        show_result(predictor, explained, typed)


def csv_tab(predictor, lock: threading.Lock) -> None:
    task = predictor.task
    st.markdown(f"A CSV or TSV with the column(s) **{', '.join(task.text_columns())}** "
                f"(an `{task.cfg.id_column}` column is optional: row numbers are used)"
                + (", each a JSON list of turns" if task.kind == "pairwise" else "")
                + ". The result has the columns of `hybridstack predict --input --output`.")
    upload = st.file_uploader("File to score", type=UPLOAD_TYPES)
    if upload is None:
        return
    key = (upload.file_id, upload.name, upload.size)
    scored = st.session_state.get("scored")
    if scored is None or scored["key"] != key:
        bar = st.progress(0.0, text=f"Scoring {upload.name}...")

        def progress(done: int, total: int) -> None:
            bar.progress(done / total, text=f"Scored {done:,} of {total:,} rows")

        try:
            with lock:
                frame = core.score_upload(predictor, upload.getvalue(), upload.name,
                                          progress=progress)
        except HybridstackError as err:
            bar.empty()
            st.error(one_line(err))
            return
        scored = {"key": key, "name": upload.name, "rows": len(frame),
                  "csv": frame.to_csv(index=False).encode("utf-8"), "preview": frame.head(100)}
        st.session_state["scored"] = scored
    st.success(f"Scored {scored['rows']:,} rows of {scored['name']}")
    st.download_button("Download the predictions (CSV)", data=scored["csv"],
                       file_name=f"{Path(scored['name']).name.split('.')[0]}_predictions.csv",
                       mime="text/csv", type="primary", on_click="ignore")
    st.dataframe(scored["preview"], hide_index=True, width="stretch")


def leaderboard_tab(run_dir: str, labels: str | None) -> None:
    rows, problem = get_leaderboard(run_dir, labels)
    if problem:
        st.warning(problem)
    if rows:
        frame = pd.DataFrame(rows)
        better = "higher" if rows[0]["greater_is_better"] else "lower"
        st.dataframe(frame.drop(columns=["greater_is_better"]), hide_index=True, width="stretch")
        held = (f"; heldout: each model's test.npy scored against {Path(labels).name}"
                if labels else "; pass --labels test_labels.csv for held-out scores")
        st.caption(f"cv: the cross-validated {rows[0]['metric']} ({better} is better) over "
                   f"rows_validated rows{held}.")
    else:
        st.info("No model has scores yet.")
    plots = core.report_plots(run_dir)
    if plots:
        st.subheader("Report")
        cols = st.columns(2)
        for i, plot in enumerate(plots):
            cols[i % 2].image(str(plot), caption=plot.stem, width="stretch")
    else:
        st.caption(f"No report plots: `hybridstack report {run_dir}` writes them.")


def main(argv: list[str]) -> None:
    args = page_args(argv)
    run_dir = str(Path(args.run_dir).resolve())
    name = Path(run_dir).name
    st.set_page_config(page_title=f"hybridstack: {name}", layout="wide")
    st.html("<style>[data-testid='stMainBlockContainer'] {padding-top: 2rem}</style>")
    try:
        predictor = get_predictor(run_dir, args.cache_dir)
    except HybridstackError as err:
        st.error(one_line(err))
        st.stop()
    lock = predictor_lock(run_dir)
    models = ", ".join(m.name for m in predictor.base_models)
    st.title(name)
    st.caption(f"{predictor.task.kind} - labels: {', '.join(predictor.label_names)} - "
               f"stack `{predictor.weights.get('method')}` over {models}")
    predict, upload, board = st.tabs(["Predict", "Score a CSV", "Leaderboard"])
    with predict:
        predict_tab(predictor, lock)
    with upload:
        csv_tab(predictor, lock)
    with board:
        leaderboard_tab(run_dir, args.labels)


main(sys.argv[1:])
