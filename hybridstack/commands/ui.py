"""``hybridstack ui <run_dir>``: the Streamlit page over a finished experiment (the ui extra);
the page itself is hybridstack/live/page.py."""

from hybridstack.live.commands import add_ui_parser as add_parser

__all__ = ["add_parser"]
