"""Cradle-like computer control on MiniWoB++ (issue 5). Importing registers the "cradle" scenario."""
