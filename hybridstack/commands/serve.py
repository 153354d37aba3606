"""``hybridstack serve <run_dir>``: the JSON HTTP service over a finished experiment (the serve
extra); the app is hybridstack/live/api.py."""

from hybridstack.live.commands import add_serve_parser as add_parser

__all__ = ["add_parser"]
